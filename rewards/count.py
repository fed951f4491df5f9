"""Counting and composition: does the image hold the numbers of objects the prompt names?

The prompt names counts (``"three apples and 2 red cups"``). An open-vocabulary detector
(OWLv2, transformers' ``Owlv2ForObjectDetection``: a local path or a hub id, default
``google/owlv2-base-patch16-ensemble``) is queried with one text per named object
(``"a photo of a red cup"``); its boxes are kept above a score threshold, de-duplicated by
class-wise non-maximum suppression, and counted per query. For each object with wanted count n
and detected count c the reward is ``1 - min(|c - n|, n) / n`` (1 for the exact count, 0 for
none or twice too many); the image's reward is the mean over the objects the prompt names.
GenEval (Ghosh et al. 2023) scores the same counts exactly-or-nothing; this graded form gives
REINFORCE a signal before the counts are right.

Prompt parsing is deliberately simple: a number (digits or one..twelve) followed by the words
up to the next comma, full stop or linking word ("and", "with", "on", "next to", ...); the last
word is made singular by rule. A prompt that names no count is an error, not a silent 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from common.hub import fetched
from common.prompts import shown
from rewards.images import as_uint8_images
from rewards.registry import register

NUMBERS = {
    w: i
    for i, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
    )
}
_STOP = r"(?:,|\.|;|:|!|\?|$|\s(?:and|with|on|in|at|of|next|near|beside|behind|under|above|below|by|to|from|or)\b)"
_COUNT = re.compile(r"\b(\d+|" + "|".join(NUMBERS) + r")\s+([a-z][a-z\- ]*?)\s*(?=" + _STOP + ")")
_IRREGULAR = {
    "people": "person",
    "men": "man",
    "women": "woman",
    "children": "child",
    "mice": "mouse",
    "geese": "goose",
    "teeth": "tooth",
    "feet": "foot",
    "knives": "knife",
    "leaves": "leaf",
    "wolves": "wolf",
    "loaves": "loaf",
    "shelves": "shelf",
    "buses": "bus",
    "sheep": "sheep",
}


def singular(word: str) -> str:
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses", "zes", "oes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def parse_counts(prompt: str) -> list[tuple[str, int]]:
    """[(object phrase, count)] in the order the prompt names them; repeats are summed."""
    found: dict[str, int] = {}
    for num, phrase in _COUNT.findall(prompt.lower()):
        n = int(num) if num.isdigit() else NUMBERS[num]
        words = phrase.split()
        if not words or n < 1:
            continue
        obj = " ".join(words[:-1] + [singular(words[-1])])
        found[obj] = found.get(obj, 0) + n
    return list(found.items())


def count_detections(
    scores: np.ndarray, labels: np.ndarray, boxes: np.ndarray, n_classes: int, threshold: float, iou: float
) -> np.ndarray:
    """Detections per class after a score threshold and class-wise NMS: int [n_classes].

    scores [P], labels [P] (class index), boxes [P, 4] as (x0, y0, x1, y1).
    """
    import torch
    from torchvision.ops import batched_nms

    keep = scores > threshold
    s, lab, b = (torch.as_tensor(np.asarray(a)[keep]) for a in (scores, labels, boxes))
    kept = batched_nms(b.float(), s.float(), lab.long(), iou) if len(s) else torch.zeros(0, dtype=torch.long)
    return np.bincount(lab[kept].numpy().astype(np.int64), minlength=n_classes)[:n_classes]


def count_reward(wanted: Sequence[int], counted: Sequence[int] | np.ndarray) -> float:
    """Mean over objects of ``1 - min(|c - n|, n) / n``."""
    w = np.asarray(wanted, dtype=np.float64)
    c = np.asarray(counted, dtype=np.float64)
    return float(np.mean(1.0 - np.minimum(np.abs(c - w), w) / w))


@register("count")
class CountReward:
    def __init__(
        self,
        model: str = "google/owlv2-base-patch16-ensemble",
        threshold: float = 0.3,
        iou: float = 0.5,
        template: str = "a photo of a {}",
        device: str | None = None,
        batch_size: int = 8,
    ):
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        from common.devices import resolve_device

        self.device = resolve_device(device or "auto")  # 'auto': the GPU its server was given, if any
        with fetched(f"count: the OWLv2 model {model!r}", "give a local directory as the reward's kwargs model"):
            detector: Any = Owlv2ForObjectDetection.from_pretrained(model)  # transformers types .to() loosely
            self.processor = Owlv2Processor.from_pretrained(model)
        self.model = detector.to(self.device).eval().requires_grad_(False)
        self.threshold, self.iou, self.template, self.batch_size = threshold, iou, template, batch_size

    def detect(self, images: list[np.ndarray], queries: list[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(scores [P], labels [P], boxes [P, 4]) per image: every patch's box, its best query."""
        import torch
        from PIL import Image

        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = [Image.fromarray(a) for a in images[i : i + self.batch_size]]
            inputs = self.processor(text=[queries] * len(chunk), images=chunk, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                res = self.model(**inputs)
            best = res.logits.float().max(dim=-1)
            cx, cy, w, h = res.pred_boxes.float().unbind(-1)
            boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
            for j in range(len(chunk)):
                out.append(
                    (best.values[j].sigmoid().cpu().numpy(), best.indices[j].cpu().numpy(), boxes[j].cpu().numpy())
                )
        return out

    def __call__(self, images: Any, prompts: Sequence[str]) -> np.ndarray:
        arrs = as_uint8_images(images)
        if len(arrs) != len(prompts):
            raise ValueError(f"count: {len(arrs)} images for {len(prompts)} prompts")
        scores = np.zeros(len(prompts), dtype=np.float32)
        for prompt in dict.fromkeys(prompts):  # the K rollouts of a context share their queries
            wanted = parse_counts(prompt)
            if not wanted:
                raise ValueError(f"count: prompt {shown(prompt)} names no count of objects ('three apples')")
            idx = [i for i, p in enumerate(prompts) if p == prompt]
            queries = [self.template.format(obj) for obj, _ in wanted]
            for i, (s, lab, b) in zip(idx, self.detect([arrs[i] for i in idx], queries), strict=True):
                counted = count_detections(s, lab, b, len(queries), self.threshold, self.iou)
                scores[i] = count_reward([n for _, n in wanted], counted)
        return scores
