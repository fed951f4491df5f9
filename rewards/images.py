"""The image forms a reward accepts, brought to one: a list of uint8 [H, W, 3] arrays.

uint8 [N, H, W, 3] is the canonical form: the one the HTTP scorer sends and the one a decoded
PNG has. A sampler may hand over float images in [0, 1] instead, channels first ([N, 3, H, W],
torch's convention) or last; they are quantised as an image file would be
(``round(255 * x)``, clipped, as diffusers' ``numpy_to_pil``), so a reward scores exactly what
a saved image would show. Grey images ([..., 1], or a batch [N, H, W]: the digits backend's) are
repeated to RGB; PIL images are converted.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np


def _one(img: Any) -> np.ndarray:
    if hasattr(img, "convert") and hasattr(img, "size"):  # a PIL image
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    if hasattr(img, "detach"):  # a torch tensor
        img = img.detach().float().cpu().numpy()
    a = np.asarray(img)
    if a.ndim != 3:
        raise ValueError(f"an image must have 3 dimensions ([H, W, C] or [C, H, W]), got shape {a.shape}")
    if a.dtype == np.uint8:
        if a.shape[-1] not in (1, 3):
            raise ValueError(f"a uint8 image must be [H, W, 3] or [H, W, 1], got shape {a.shape}")
    elif np.issubdtype(a.dtype, np.floating):
        if a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
            a = a.transpose(1, 2, 0)
        if a.shape[-1] not in (1, 3):
            raise ValueError(f"a float image must be [3, H, W] or [H, W, 3] in [0, 1], got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError("an image has non-finite pixels")
        a = np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {a.dtype}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"an empty image of shape {a.shape}")
    return a


def as_uint8_images(images: Any) -> list[np.ndarray]:
    """A batch (an array or tensor [N, ...], or a sequence of images) -> N uint8 [H, W, 3] arrays."""
    if hasattr(images, "ndim") and images.ndim == 4:
        return [_one(images[i]) for i in range(images.shape[0])]
    if hasattr(images, "ndim") and images.ndim == 3:  # N grey images [H, W]
        return [_one(images[i][..., None]) for i in range(images.shape[0])]
    if isinstance(images, (list, tuple)):
        return [_one(img) for img in images]
    raise ValueError(
        f"images must be a batch [N, H, W, 3] / [N, 3, H, W] / [N, H, W] or a list of images, got"
        f" {type(images).__name__}" + (f" of shape {tuple(images.shape)}" if hasattr(images, "shape") else "")
    )


def stack_uint8(images: Any) -> np.ndarray:
    """Same-size images as one uint8 [N, H, W, 3] array (the HTTP scorer's wire form)."""
    arrs = as_uint8_images(images)
    shapes = {a.shape for a in arrs}
    if len(shapes) > 1:
        raise ValueError(f"images of different sizes cannot be stacked: {sorted(shapes)}")
    return np.stack(arrs) if arrs else np.zeros((0, 1, 1, 3), np.uint8)


def downscale(images: np.ndarray, size: int, threads: int = 1) -> np.ndarray:
    """A batch [N, H, W, 3] uint8 (or float [N, 3, H, W] / [N, H, W, 3]) with its longest side
    brought down to ``size`` (bicubic, antialiased: PIL's for uint8 RGB, as CLIP resizes; torch's,
    which matches it, otherwise), in the same layout
    and dtype; smaller images and non-image batches (e.g. the toy's vectors) are returned as they
    are. The rollout workers apply it where every reward declares the side it reads
    (``input_size``), so 1024² images do not travel to a reward that reads 224².

    ``threads`` > 1 resizes uint8 RGB images that many at a time (PIL releases the GIL while it
    resizes), each image by the same call: the result is the same for any number. A worker's
    cores sit idle while its GPU samples, and at 1024² the resize is the most CPU a request costs
    (``rollout.image_threads``)."""
    import torch
    import torch.nn.functional as F

    a = np.asarray(images)
    if a.ndim != 4:
        return images
    last = a.shape[-1] in (1, 3) and a.shape[1] not in (1, 3)  # channels last
    h, w = (a.shape[1], a.shape[2]) if last else (a.shape[2], a.shape[3])
    if max(h, w) <= size:
        return images
    new = [max(1, round(d * size / max(h, w))) for d in (h, w)]
    if a.dtype == np.uint8 and last and a.shape[-1] == 3:  # the common case: PIL's SIMD resize, as CLIP's own
        from PIL import Image

        def one(img: np.ndarray) -> np.ndarray:
            return np.asarray(Image.fromarray(img).resize((new[1], new[0]), Image.Resampling.BICUBIC))

        workers = min(threads, len(a))
        if workers < 2:
            return np.stack([one(img) for img in a])
        # a pool of its own for each call (a thread starts in about 0.1 ms, a 1024² resize takes
        # 10-15): no threads kept between requests, none inherited by a fork
        with ThreadPoolExecutor(workers, thread_name_prefix="downscale") as pool:
            return np.stack(list(pool.map(one, a)))
    x = torch.from_numpy(np.ascontiguousarray(a)).float()
    if last:
        x = x.permute(0, 3, 1, 2)
    y = F.interpolate(x, size=new, mode="bicubic", antialias=True, align_corners=False)
    if last:
        y = y.permute(0, 2, 3, 1)
    if a.dtype == np.uint8:
        return y.round().clamp(0, 255).to(torch.uint8).numpy()
    return y.numpy().astype(a.dtype)
