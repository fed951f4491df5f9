"""CLIP score and PickScore: image-text similarity of a transformers CLIP model.

Both embed the image and the prompt with a ``CLIPModel`` and its processor (a local path or a
hub id, loaded once), normalise, and take the cosine; they differ in the scale:

- ``clip``: CLIP score as torchmetrics defines it (``torchmetrics.multimodal.CLIPScore``):
  ``100 * max(cos, 0)``. Default model ``openai/clip-vit-large-patch14``.
- ``pickscore``: Kirstain et al. 2023, "Pick-a-Pic", the reference code of
  github.com/yuvalkirstain/PickScore: ``logit_scale.exp() * cos`` with the model
  ``yuvalkirstain/PickScore_v1`` and the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``;
  prompts padded and truncated to 77 tokens.

Text features are cached per prompt; images go through the model in batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from common.hub import fetched
from common.prompt_cache import PromptCache
from rewards.images import as_uint8_images
from rewards.registry import register

if TYPE_CHECKING:  # torch is imported where a model is built, not at import
    import torch


def _features(out: Any) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output with pooler_output (5)."""
    return out if hasattr(out, "dim") else out.pooler_output


class ClipEmbedder:
    """A transformers CLIPModel + processor: normalised image features and cached text features."""

    def __init__(
        self,
        model: str,
        processor: str | None = None,
        device: str | None = None,
        batch_size: int = 16,
        cache_prompts: int = 4096,
        dtype: str = "float32",
    ):
        import torch

        from common.devices import resolve_device

        try:
            from transformers import AutoProcessor, CLIPModel
        except ImportError as e:  # pragma: no cover - transformers is a core dependency
            raise ImportError(f"CLIP rewards need transformers: {e}") from None
        self.device = resolve_device(device or "auto")  # 'auto': the GPU its server was given, if any
        with fetched(f"CLIP model {model!r}", "give a local directory as the reward's kwargs model"):
            # transformers types .to() loosely
            clip: Any = CLIPModel.from_pretrained(model, dtype=getattr(torch, dtype))
            self.processor = AutoProcessor.from_pretrained(processor or model)
        self.model = clip.to(self.device).eval()
        self.model.requires_grad_(False)
        self.batch_size = batch_size
        self.text_features: PromptCache[torch.Tensor] = PromptCache(self._encode_text, cache_prompts)

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        import torch

        tok = self.processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.inference_mode():
            f = _features(self.model.get_text_features(**{k: v.to(self.device) for k, v in tok.items()}))
        return torch.nn.functional.normalize(f.float(), dim=-1)

    def cosine(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        """cos(image_i, prompt_i) for each pair, float32 [N]."""
        import torch
        from PIL import Image

        arrs = as_uint8_images(images)
        if len(arrs) != len(prompts):
            raise ValueError(f"{len(arrs)} images for {len(prompts)} prompts")
        text = torch.stack(self.text_features.get(list(prompts)))
        out = []
        for i in range(0, len(arrs), self.batch_size):
            pil = [Image.fromarray(a) for a in arrs[i : i + self.batch_size]]
            pix = self.processor(images=pil, return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                f = _features(self.model.get_image_features(pixel_values=pix.to(self.device, self.model.dtype)))
            f = torch.nn.functional.normalize(f.float(), dim=-1)
            out.append((f * text[i : i + self.batch_size]).sum(-1))
        return torch.cat(out).cpu() if out else torch.zeros(0)


@register("clip")
class ClipScore:
    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        device: str | None = None,
        batch_size: int = 16,
        cache_prompts: int = 4096,
        dtype: str = "float32",
    ):
        """The arguments of ClipEmbedder, written out so that a misspelt kwarg is refused before a run."""
        self.clip = ClipEmbedder(model, processor, device, batch_size, cache_prompts, dtype)

    def __call__(self, images: Any, prompts: Sequence[str]) -> np.ndarray:
        return (100.0 * self.clip.cosine(images, prompts).clamp(min=0)).numpy().astype(np.float32)


@register("pickscore")
class PickScore:
    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        device: str | None = None,
        batch_size: int = 16,
        cache_prompts: int = 4096,
        dtype: str = "float32",
    ):
        """The arguments of ClipEmbedder, written out so that a misspelt kwarg is refused before a run."""
        self.clip = ClipEmbedder(model, processor, device, batch_size, cache_prompts, dtype)
        self.logit_scale = float(self.clip.model.logit_scale.exp())

    def __call__(self, images: Any, prompts: Sequence[str]) -> np.ndarray:
        return (self.logit_scale * self.clip.cosine(images, prompts)).numpy().astype(np.float32)
