"""What the diffusers backends (flux, sd3, sd) share: loading a pipeline from its config section,
the per-prompt cache of encoder outputs, x_T from a seed, schedule checks and image conversion.

The backends own their denoising loops (every sample has its own schedule; a stock scheduler holds
one scalar step index) but reuse the pipelines' own encoders, helpers and VAE.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import DiffusersSection
from common.prompts import read_prompt_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_pipeline(cls: Any, cfg: DiffusersSection, **extra: Any) -> Any:
    """``cls.from_pretrained`` with the section's model, revision and dtype (``prepare_pipeline``
    is the backend's job)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    return cls.from_pretrained(
        cfg.model,
        torch_dtype=DTYPES[cfg.dtype],
        revision=cfg.revision,
        local_files_only=cfg.local_files_only,
        **extra,
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


class PromptCache:
    """Encoder outputs per prompt, least recently used evicted: each prompt is encoded once."""

    def __init__(self, encode: Callable[[list[str]], list[Any]], capacity: int):
        self.encode, self.capacity = encode, capacity
        self._items: OrderedDict[str, Any] = OrderedDict()

    def get(self, prompts: Sequence[str]) -> list[Any]:
        new = [p for p in dict.fromkeys(prompts) if p not in self._items]
        if new:
            self._items.update(zip(new, self.encode(new), strict=True))
        for p in prompts:
            self._items.move_to_end(p)
        out = [self._items[p] for p in prompts]
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return out


def stack(items: Sequence[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    return torch.stack([it[key] for it in items])
