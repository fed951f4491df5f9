"""Text rendering: how much of the prompt's quoted text an OCR engine reads in the image.

The prompt names the text to render in double quotes (``a sign that says "OPEN 24 HOURS"``).
The reward is the recall of that text by edit distance, as Flow-GRPO's OCR reward
(github.com/yifan123/flow_grpo, ``flow_grpo/ocr.py``): both strings lower-cased with spaces
removed, ``1 - min(d, len(target)) / len(target)``. One change: ``d`` is the edit distance of
the target to the best-matching *substring* of what was read (Sellers' approximate substring
match), so other text in the image (a logo, a caption) does not count against the quoted text
the prompt asked for. Several quoted spans are scored together, weighted by their lengths.

Engine: RapidOCR (PyPI ``rapidocr``; PaddleOCR's PP-OCR detection and recognition models as
ONNX, run by onnxruntime). Its wheel ships the models, so it works offline and installs with
pip alone (docs/rewards.md says why it was chosen).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from common.prompts import shown
from rewards.images import as_uint8_images
from rewards.registry import register

_QUOTED = re.compile(r'"([^"]+)"|\u201c([^\u201d]+)\u201d')


def quoted_text(prompt: str) -> list[str]:
    """The double-quoted spans of a prompt ("..." or curly quotes)."""
    return [a or b for a, b in _QUOTED.findall(prompt) if (a or b).strip()]


def _norm(s: str) -> str:
    return "".join(s.lower().split())


def substring_distance(target: str, text: str) -> int:
    """Edit distance of ``target`` to the best-matching substring of ``text`` (Sellers 1980)."""
    prev = [0] * (len(text) + 1)  # a match may start anywhere in text: row 0 is all zeros
    for i, t in enumerate(target, 1):
        cur = [i] + [0] * len(text)
        for j, c in enumerate(text, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (t != c))
        prev = cur
    return min(prev)  # ... and end anywhere


def text_recall(targets: Sequence[str], read: str) -> float:
    """1 - (edit distance, capped at each target's length) / total target length."""
    read = _norm(read)
    targets = [_norm(t) for t in targets if _norm(t)]
    total = sum(len(t) for t in targets)
    if total == 0:
        raise ValueError("no quoted text to look for")
    missed = sum(min(substring_distance(t, read), len(t)) for t in targets)
    return 1.0 - missed / total


@register("ocr")
class OCRReward:
    def __init__(self, min_confidence: float = 0.5, threads: int = 1, require_quotes: bool = True):
        """
        min_confidence: recognised lines scored below this are dropped (RapidOCR's text_score).
        threads: onnxruntime intra-op threads.
        require_quotes: a prompt without quoted text is an error (else it scores 0).
        """
        try:
            from rapidocr import RapidOCR
        except ImportError as e:
            raise ImportError(
                f"the ocr reward needs rapidocr and onnxruntime (pip install rapidocr onnxruntime): {e}"
            ) from None
        self.require_quotes = require_quotes
        self.engine = RapidOCR(
            params={
                "Global.log_level": "error",
                "Global.text_score": min_confidence,
                "EngineConfig.onnxruntime.intra_op_num_threads": threads,
                "EngineConfig.onnxruntime.inter_op_num_threads": 1,
            }
        )

    def read(self, image: np.ndarray) -> str:
        """All the text the engine reads in one uint8 [H, W, 3] image, lines joined by spaces."""
        out = self.engine(np.ascontiguousarray(image[..., ::-1]))  # RapidOCR takes OpenCV's BGR
        return " ".join(getattr(out, "txts", None) or ())

    def __call__(self, images: Any, prompts: Sequence[str]) -> np.ndarray:
        arrs = as_uint8_images(images)
        if len(arrs) != len(prompts):
            raise ValueError(f"ocr: {len(arrs)} images for {len(prompts)} prompts")
        scores = []
        for img, prompt in zip(arrs, prompts, strict=True):
            targets = quoted_text(prompt)
            if not targets:
                if self.require_quotes:
                    raise ValueError(f"ocr: prompt {shown(prompt)} quotes no text to render (put it in double quotes)")
                scores.append(0.0)
                continue
            scores.append(text_recall(targets, self.read(img)))
        return np.asarray(scores, dtype=np.float32)
