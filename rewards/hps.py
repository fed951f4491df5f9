"""HPSv2 and HPSv2.1 (Wu et al. 2023, "Human Preference Score v2"), the paper's reward.

The `hpsv2` package (1.2.0) is not used: it is broken as shipped (its tokenizer's BPE file is
missing), pins protobuf<4 (Ray needs a newer one), downloads ViT-H-14 on first use and reloads
the checkpoint on every call (docs/rewards.md). The same model is built here with
open-clip-torch (`ViT-H-14`, ``pretrained=None``) and the HPS checkpoint is loaded once, from a
local path. Scoring follows ``hpsv2/img_score.py::score`` (hpsv2 1.2.0):

- preprocessing is its ``image_transform(..., is_train=False, resize_longest_max=True)``
  (``hpsv2/src/open_clip/transform.py``): RGB, ``ToTensor`` (uint8 / 255), resize the longer
  side to 224 on the float tensor (bicubic, antialias: torchvision's tensor resize), zero-pad to
  a square (the odd pixel on the right / bottom), normalise by the CLIP mean and std;
- the score is the cosine of the normalised image and text features, ``image_features @
  text_features.T`` diagonal, without the logit scale (papers print it x100: ``scale=100``);
- on CUDA it runs under fp16 autocast as hpsv2 does; on CPU in float32.

Changes: batched (hpsv2 scores one image at a time), text features cached per prompt, and an
image whose longer side is already 224 but is not square is padded too (hpsv2 skips the pad
then and the model fails on it). ``tests/fixtures/hps/make_fixture.py`` produced the reference
scores with hpsv2's own code; ``tests/unit/test_hps.py`` checks them to 1e-5.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from common.hub import dropping, fetched
from common.prompt_cache import PromptCache
from rewards.images import as_uint8_images
from rewards.registry import register

if TYPE_CHECKING:  # torch is imported where a model is built, not at import
    import torch

CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HUB_REPO = "xswu/HPSv2"


def _open_clip():
    try:
        import open_clip
    except ImportError as e:
        raise ImportError(f"the hps reward needs open-clip-torch (pip install open-clip-torch): {e}") from None
    return open_clip


def load_hps_state(path: str | Path) -> dict[str, Any]:
    """The model state of an HPS checkpoint ({'state_dict': ...}, maybe 'module.'-prefixed).

    Loaded with ``weights_only=True``: tensors and plain containers only, never arbitrary pickles.
    """
    import torch

    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not an HPS checkpoint (expected a dict with 'state_dict')")
    return {k.removeprefix("module."): v for k, v in state.items()}


def preprocess(image: np.ndarray, size: int = 224) -> torch.Tensor:
    """uint8 [H, W, 3] -> normalised float32 [3, size, size], exactly as hpsv2's val transform."""
    import torch
    import torchvision.transforms.functional as F
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from torchvision.transforms import InterpolationMode

    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous().float().div(255)
    h, w = x.shape[1:]
    scale = size / float(max(h, w))
    if scale != 1.0 or h != w:
        new = tuple(round(d * scale) for d in (h, w))
        if new != (h, w):
            x = F.resize(x, list(new), InterpolationMode.BICUBIC, antialias=True)
        pad_h, pad_w = size - new[0], size - new[1]
        x = F.pad(x, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return F.normalize(x, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)


@register("hps")
class HPSReward:
    def __init__(
        self,
        checkpoint: str | None = None,
        version: Literal["v2.0", "v2.1"] = "v2.1",
        arch: str = "ViT-H-14",
        device: str | None = None,
        batch_size: int = 8,
        scale: float = 1.0,
        cache_prompts: int = 4096,
        amp: bool | None = None,
        random_weights: bool = False,
    ):
        """
        checkpoint: local path of HPS_v2_compressed.pt / HPS_v2.1_compressed.pt. None: fetched
            once from the hub ("xswu/HPSv2", the file of ``version``) into the hub cache.
        arch: an open_clip model name, or the path of an open_clip model-config JSON (the tests'
            tiny architecture).
        scale: multiplies the score (hpsv2 returns the cosine; papers print 100x).
        cache_prompts: text features kept per prompt (0: no cache).
        amp: fp16 autocast (default: on CUDA, as hpsv2; never on CPU).
        random_weights: skip the checkpoint (benchmarks of the architecture only).
        """
        from common.devices import resolve_device

        open_clip = _open_clip()
        if version not in CHECKPOINTS:
            raise ValueError(f"hps: version must be one of {sorted(CHECKPOINTS)}, got {version!r}")
        if arch.endswith(".json"):
            if not Path(arch).is_file():
                raise FileNotFoundError(f"hps: no model config at {arch}")
            open_clip.add_model_config(arch)
            arch = Path(arch).stem
        self.device = resolve_device(device or "auto")  # 'auto': the GPU its server was given, if any
        self.amp = (self.device.type == "cuda") if amp is None else amp
        self.batch_size = batch_size
        self.scale = scale
        if not random_weights:  # found before the model is built: a missing file is said at once
            if checkpoint is None:
                from huggingface_hub import hf_hub_download

                with fetched(
                    f"hps: the HPS {version} checkpoint ({CHECKPOINTS[version]} of {HUB_REPO})",
                    "give the path of a copy as the reward's kwargs checkpoint",
                ):
                    checkpoint = hf_hub_download(HUB_REPO, CHECKPOINTS[version])
            if not Path(checkpoint).is_file():
                raise FileNotFoundError(
                    f"hps: no checkpoint at {checkpoint} (HPS {version} is {CHECKPOINTS[version]} of the hub"
                    f" repo {HUB_REPO})"
                )
        # open_clip warns (through the root logger) that a model built without its pretrained
        # weights is "initialized randomly": wrong on every run's terminal where the checkpoint
        # is loaded right after; with random_weights it is true, and stays
        with dropping([] if random_weights else [""], lambda r: "initialized randomly" in r.getMessage()):
            model = open_clip.create_model(arch, pretrained=None, precision="fp32", device="cpu")
        if checkpoint is not None and not random_weights:
            model.load_state_dict(load_hps_state(checkpoint), strict=True)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.image_size = int(np.atleast_1d(self.model.visual.image_size)[0])
        self.input_size = self.image_size  # the workers may send images downscaled to it (rollout side)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.text_features: PromptCache[torch.Tensor] = PromptCache(self._encode_text, cache_prompts)

    def _autocast(self):
        import torch

        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp)

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        import torch

        with torch.inference_mode(), self._autocast():
            feats = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True)
        return feats.float()

    def __call__(self, images: Any, prompts: Sequence[str]) -> np.ndarray:
        import torch

        arrs = as_uint8_images(images)
        if len(arrs) != len(prompts):
            raise ValueError(f"hps: {len(arrs)} images for {len(prompts)} prompts")
        text = torch.stack(self.text_features.get(list(prompts)))
        out = []
        for i in range(0, len(arrs), self.batch_size):
            x = torch.stack([preprocess(a, self.image_size) for a in arrs[i : i + self.batch_size]])
            with torch.inference_mode(), self._autocast():
                img = self.model.encode_image(x.to(self.device), normalize=True).float()
            out.append((img * text[i : i + self.batch_size]).sum(-1))
        scores = torch.cat(out).cpu().numpy() if out else np.zeros(0)
        return (self.scale * scores).astype(np.float32)
