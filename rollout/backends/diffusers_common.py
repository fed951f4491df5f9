"""The diffusers backends (flux, sd3, sd) by composition: ``DiffusersSampler`` does what every
family does (loading, devices and dtype, prompts, the bounded cache of encoder outputs, policy
features, x_T from a seed, chunking, images); a family (``FluxFamily``, ``SD3Family``,
``SDFamily``) supplies only its encoders, its time map and its denoising loop (``DiffusersFamily``).

The families own their loops (every sample has its own schedule; a stock scheduler holds one
scalar step index) but reuse the pipelines' own encoders, helpers and VAE.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from common.config import DiffusersSection
from common.devices import resolve_device
from common.hub import fetched
from common.messages import SamplerSpec
from common.prompt_cache import PromptCache
from common.prompts import read_prompt_file
from rollout.backends.prompts import EVAL_PROMPTS, TRAIN_PROMPTS
from rollout.sampler import PromptFeatures

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_kwarg() -> str:
    """The name under which this diffusers' ``from_pretrained`` takes the dtype: ``dtype`` from
    0.40 (``torch_dtype`` still works there, with a FutureWarning on every load, from every
    rollout worker), ``torch_dtype`` before (where ``dtype`` would be ignored: a float32 Flux)."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__).release >= (0, 40) else "torch_dtype"


def load_pipeline(cls: Any, cfg: DiffusersSection, **extra: Any) -> Any:
    """``cls.from_pretrained`` with the section's model, revision and dtype (``prepare_pipeline``
    is the backend's job)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    with fetched_pipeline(cfg):
        return cls.from_pretrained(
            cfg.model,
            **{dtype_kwarg(): DTYPES[cfg.dtype]},
            revision=cfg.revision,
            local_files_only=cfg.local_files_only,
            **extra,
        )


def fetched_pipeline(cfg: DiffusersSection) -> AbstractContextManager[None]:
    """A hub load of the section's model: one line when the hub gives no copy (common.hub)."""
    return fetched(
        f"sampler model {cfg.model!r}",
        "give a local directory laid out as a diffusers pipeline (README: Real models and local weights)",
    )


def prepare_pipeline(pipe, cfg: DiffusersSection):
    """Eval mode everywhere, no progress bars, device or CPU offload, attention backend."""
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            # modules built from a config start in train mode (T5 dropout would make runs differ)
            module.eval().requires_grad_(False)
    device = resolve_device(cfg.device)
    if cfg.cpu_offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif cfg.cpu_offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    if cfg.attention_backend is not None:
        denoiser = getattr(pipe, "transformer", None) or pipe.unet
        denoiser.set_attention_backend(cfg.attention_backend)
    return pipe


def check_flow_scheduler(pipe, backend: str) -> None:
    """Flow backends run the deterministic Euler flow; a scheduler set otherwise is an error."""
    sched = pipe.scheduler.config
    if sched.get("stochastic_sampling") or sched.get("invert_sigmas"):
        raise ValueError(
            f"the {backend} backend runs the deterministic Euler flow: stochastic_sampling and"
            " invert_sigmas must be off"
        )


def image_size(cfg: DiffusersSection, default_h: int, default_w: int, multiple: int, backend: str) -> tuple[int, int]:
    """(height, width) from the config or the pipeline's default; a size the latents cannot hold
    exactly is an error (the pipelines would silently resize it)."""
    height, width = cfg.height or default_h, cfg.width or default_w
    if height % multiple or width % multiple:
        raise ValueError(f"{backend} height and width must be multiples of {multiple}, got {height}x{width}")
    return height, width


def read_prompts(path: Path | None, default: Sequence[str]) -> list[str]:
    """Prompts from a text file, one per line (blank lines skipped; checked by
    ``common.prompts.read_prompt_file``), or ``default``."""
    return list(default) if path is None else read_prompt_file(path)


def draw_noise(seeds: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """x_T for each seed, [N, *shape] float32, drawn on the CPU by a torch generator seeded with it.

    The same numbers a stock diffusers pipeline draws for one image with
    ``generator=torch.Generator("cpu").manual_seed(seed)``, on any machine.
    """
    out = np.empty((len(seeds), *shape), dtype=np.float32)
    for i, s in enumerate(seeds):
        gen = torch.Generator("cpu").manual_seed(int(s))
        out[i] = torch.randn(tuple(shape), generator=gen, dtype=torch.float32).numpy()
    return out


def check_times(times: np.ndarray, n: int) -> np.ndarray:
    """[N, L] strictly decreasing evaluation times in (0, 1], float64, or a ValueError."""
    times = np.asarray(times, dtype=np.float64)
    if times.ndim != 2 or times.shape[0] != n or times.shape[1] < 1:
        raise ValueError(f"times must be [N={n}, L >= 1], got shape {times.shape}")
    if not np.all(np.isfinite(times)) or np.any(times > 1.0) or np.any(times <= 0.0):
        raise ValueError("evaluation times must lie in (0, 1]")
    if np.any(np.diff(times, axis=1) >= 0):
        raise ValueError("evaluation times must decrease strictly (two equal times would be a zero-length step)")
    return times


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] -> uint8, rounded as diffusers' numpy_to_pil does."""
    return (images * 255).round().astype(np.uint8)


def chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def stack(items: Sequence[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    return torch.stack([it[key] for it in items])


#: The time maps of the families (common/schedule.py): what t means to the model.
FLOW_TIME = "flow: sigma = t (the scheduler's own shift not applied)"
EPSILON_TIME = "epsilon: timestep = t*T - 1, Euler in the model's sigma(timestep)"


class DiffusersFamily(Protocol):
    """What one pipeline family supplies to ``DiffusersSampler``: its encoders, its time map and
    its denoising loop. Built on a prepared pipeline (devices, dtype, offload already set)."""

    backend: str  # the config's backend name
    time_convention: str  # FLOW_TIME or EPSILON_TIME
    x_shape: tuple[int, int, int]  # one initial noise, image-shaped [C, h, w]
    token_dim: int  # width of the text tokens the denoiser cross-attends to
    pooled_dim: int  # width of the pooled text embedding

    def default_tau(self, steps: int) -> np.ndarray:
        """The stock schedule at ``steps`` NFE as a point of the simplex (the family's time map)."""
        ...

    def call_kwargs(self) -> dict[str, Any]:
        """The stock pipeline's ``__call__`` settings under which its image is this family's (the
        guidance, the negative prompt, the T5 length): a policy records them, an export returns them."""
        ...

    def reads(self) -> dict[str, Any]:
        """The pipeline's settings the policy's inputs and the images of its times are made of,
        beyond its class and sizes (SD: the scheduler's betas and initial-noise rule; SD3: whether
        the text tokens are T5's): a policy records them, an export compares them."""
        ...

    def encode_batch(self, prompts: list[str]) -> list[dict[str, Any]]:
        """Per prompt: the denoiser's conditioning, with ``embeds`` [T, E], ``pooled`` [P] and
        ``span`` (start, length) of the prompt's real tokens in ``embeds``."""
        ...

    def run(self, conds: list[dict[str, Any]], noise: np.ndarray, times: np.ndarray) -> np.ndarray:
        """The loop: float images [n, H, W, 3] in [0, 1], sample i on its own ``times[i]``."""
        ...


class DiffusersSampler:
    """The Sampler of every diffusers family: prompts, the bounded conditioning cache, policy
    features, the initial noise, chunking and the images; the family runs its own loop."""

    def __init__(
        self, family: Callable[[Any, Any], DiffusersFamily], pipe: Any, cfg: DiffusersSection, prepare: bool = True
    ):
        """``family(prepared pipe, cfg)`` builds the family (e.g. ``FluxFamily``). ``prepare=False``
        leaves ``pipe`` as it is (its device, offload, modes and progress bars: a user's pipeline)."""
        self.cfg = cfg
        self.pipe = prepare_pipeline(pipe, cfg) if prepare else pipe
        self.family = family(self.pipe, cfg)
        self.x_shape = self.family.x_shape
        self.train_prompts = read_prompts(cfg.prompt_file, TRAIN_PROMPTS)
        self.eval_prompts = read_prompts(cfg.eval_prompt_file, EVAL_PROMPTS)
        self._cache: PromptCache[dict[str, Any]] = PromptCache(self.family.encode_batch, cfg.prompt_cache)

    @classmethod
    def from_pretrained(
        cls, family: Callable[[Any, Any], DiffusersFamily], pipeline: Any, cfg: DiffusersSection, **extra: Any
    ) -> DiffusersSampler:
        """The sampler of ``family`` on ``pipeline`` (a diffusers class) loaded from ``cfg``."""
        return cls(family, load_pipeline(pipeline, cfg, **extra), cfg)

    def spec(self) -> SamplerSpec:
        f = self.family
        return SamplerSpec(
            backend=f.backend,
            x_shape=f.x_shape,
            token_dim=f.token_dim,
            pooled_dim=f.pooled_dim,
            train_prompts=self.train_prompts,
            eval_prompts=self.eval_prompts,
            pipeline=type(self.pipe).__name__,
            time_convention=f.time_convention,
            call_kwargs=f.call_kwargs(),
            reads=f.reads(),
        )

    def default_tau(self, steps: int) -> np.ndarray:
        return self.family.default_tau(steps)

    def ays_tau(self, steps: int) -> np.ndarray | None:
        """Align Your Steps at ``steps`` NFE where diffusers has it for this family (SD1.5, SDXL), else None."""
        ays = getattr(self.family, "ays_tau", None)
        return None if ays is None else ays(steps)

    def encode(self, prompts: list[str]) -> list[PromptFeatures]:
        """The policy's view of each prompt: its real tokens (trimmed) and the pooled embedding."""
        out = []
        for c in self._cache.get(prompts):
            start, length = c["span"]
            tokens = c["embeds"][start : start + length].float().cpu().numpy()
            out.append(PromptFeatures(tokens=tokens, pooled=c["pooled"].float().cpu().numpy()))
        return out

    def initial_noise(self, seeds: list[int]) -> np.ndarray:
        return draw_noise(seeds, self.x_shape)

    def sample(self, prompts: list[str], noise: np.ndarray, times: np.ndarray) -> np.ndarray:
        """uint8 images [N, H, W, 3]; sample n runs its own schedule ``times[n]``."""
        return to_uint8(self.generate(prompts, noise, times))

    def generate(self, prompts: list[str], noise: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Float images [N, H, W, 3] in [0, 1] (what the stock pipeline returns with output_type='np'),
        in chunks of ``max_batch_size`` samples."""
        times = check_times(times, len(prompts))
        if noise.shape != (len(prompts), *self.x_shape):
            raise ValueError(f"noise must be [{len(prompts)}, {', '.join(map(str, self.x_shape))}], got {noise.shape}")
        conds = self._cache.get(prompts)
        out = [self.family.run(conds[s], noise[s], times[s]) for s in chunks(len(prompts), self.cfg.max_batch_size)]
        self.pipe.maybe_free_model_hooks()
        return np.concatenate(out)
