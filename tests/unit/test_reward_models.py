"""The transformers and OCR built-ins on tiny random models saved to a folder (no downloads):
CLIP score, PickScore, the OWLv2 counting reward (its logic on controlled detector outputs too)
and the OCR reward reading text that PIL renders."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from rewards.count import CountReward, count_detections, count_reward, parse_counts, singular
from rewards.images import as_uint8_images, stack_uint8
from rewards.ocr import quoted_text, substring_distance, text_recall
from rewards.registry import build, registered
from tests.conftest import REPO
from tests.fixtures.tiny_hf import save_tiny_clip, save_tiny_owlv2


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def _images(n: int, h: int = 40, w: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_registry_lists_the_builtins_without_heavy_imports():
    assert {"toy", "hps", "clip", "pickscore", "ocr", "count", "http"} <= set(registered())
    code = (
        "import sys; from rewards.registry import registered; registered(); "
        "print([m for m in ('open_clip', 'transformers', 'rapidocr', 'onnxruntime') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_a_server_whose_reward_needs_no_torch_never_loads_it():
    """The toy's and an HTTP reward's servers do not load torch (seconds and hundreds of MB per
    server): a built-in is looked up through the modules before its own, those that load no model
    library first. The server's thread cap still reaches torch where a reward loads it later
    (OMP_NUM_THREADS), and at once where torch is loaded."""
    code = (
        "import sys; from rewards.actors import RewardServer; from rewards.registry import limit_torch_threads; "
        "RewardServer('toy', {}, torch_threads=1, sampler={'backend': 'toy', 'toy': {'dim': 4}}); "
        "RewardServer('http', {'url': 'http://127.0.0.1:9'}, torch_threads=1); "
        "print('torch' in sys.modules); import torch; print(torch.get_num_threads()); "
        "limit_torch_threads(2); print(torch.get_num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO, env=env)
    assert out.stdout.split() == ["False", "1", "2"]


def test_missing_optional_dependency_is_a_clear_error_at_build(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ImportError, match="needs open-clip-torch"):
        build("hps", {"random_weights": True})
    monkeypatch.setitem(sys.modules, "rapidocr", None)
    with pytest.raises(ImportError, match="needs rapidocr"):
        build("ocr", {})


def test_clip_score_and_pickscore_match_the_model_forward(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    images = _images(5)
    prompts = ["a red cat", "a blue dog", "a red cat", "two birds", "a red cat"]
    clip = build("clip", {"model": str(tiny_clip), "batch_size": 2})
    pick = build("pickscore", {"model": str(tiny_clip), "processor": None, "batch_size": 2})
    s_clip, s_pick = clip(images, prompts), pick(images, prompts)
    assert s_clip.dtype == s_pick.dtype == np.float32 and s_pick.shape == (5,)

    # reference: the model's own forward on the whole batch (logits_per_image = scale * cos)
    model, proc = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    from PIL import Image

    inputs = proc(text=prompts, images=[Image.fromarray(a) for a in images], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image.diagonal()
    scale = model.logit_scale.exp().detach()
    np.testing.assert_allclose(s_pick, logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(s_clip, (100 * (logits / scale).clamp(min=0)).numpy(), atol=1e-3)
    assert clip.clip.text_features.misses == 3  # one text forward per distinct prompt


def test_count_parsing_and_grading():
    assert parse_counts("three apples and 2 red cups on a table") == [("apple", 3), ("red cup", 2)]
    assert parse_counts("a photo of four people next to two dogs.") == [("person", 4), ("dog", 2)]
    assert parse_counts("one cat, one cat") == [("cat", 2)]
    assert parse_counts("a cat on a mat") == []
    assert [singular(w) for w in ("boxes", "cherries", "glasses", "bus", "buses", "sheep")] == [
        "box",
        "cherry",
        "glass",
        "bus",
        "bus",
        "sheep",
    ]
    assert count_reward([3, 2], [3, 2]) == 1.0
    assert count_reward([2], [0]) == 0.0 and count_reward([2], [4]) == 0.0 and count_reward([2], [9]) == 0.0
    assert count_reward([4, 2], [3, 2]) == pytest.approx((0.75 + 1.0) / 2)


def test_count_detections_thresholds_and_suppresses_duplicates():
    boxes = np.array([[0, 0, 10, 10], [0.5, 0, 10.5, 10], [20, 20, 30, 30], [0, 0, 10, 10], [50, 50, 60, 60]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.1])
    labels = np.array([0, 0, 0, 1, 1])
    # box 1 duplicates box 0 (same class, IoU 0.9); box 3 overlaps box 0 but is another class; box 4 is below threshold
    assert count_detections(scores, labels, boxes, 3, threshold=0.3, iou=0.5).tolist() == [2, 1, 0]
    assert count_detections(scores, labels, boxes, 2, threshold=0.95, iou=0.5).tolist() == [0, 0]


def test_count_reward_end_to_end_on_controlled_detections(tmp_path):
    r = CountReward(model=str(save_tiny_owlv2(tmp_path / "owl")), threshold=0.3)
    # the tiny random detector runs for real: finite rewards in [0, 1]
    real = r(_images(3, 64, 80), ["two cats", "two cats", "one dog and 3 cups"])
    assert real.shape == (3,) and np.all((real >= 0) & (real <= 1))

    counts = {1: [[2], [1]], 2: [[1, 3]]}  # per query count: 2 cats, then 1 cat; 1 dog + 3 cups

    def fake_detect(images, queries):
        seen.append(queries)
        out = []
        for n in counts[len(queries)][: len(images)]:
            labels = np.repeat(np.arange(len(n)), n)
            boxes = np.array([[20.0 * k, 0, 20.0 * k + 10, 10] for k in range(len(labels))])
            out.append((np.full(len(labels), 0.9), labels, boxes))
        return out

    seen: list = []
    r.detect = fake_detect
    s = r(_images(3), ["two cats", "two cats", "one dog and 3 cups"])
    assert s.tolist() == [1.0, 0.5, 1.0]
    assert seen == [["a photo of a cat"], ["a photo of a dog", "a photo of a cup"]]
    with pytest.raises(ValueError, match="'a cat' names no count"):
        r(_images(1), ["a cat"])


def test_ocr_helpers():
    assert quoted_text('a sign that says "Open 24 Hours" and \u201cNo Parking\u201d') == ["Open 24 Hours", "No Parking"]
    assert substring_distance("open", "xxopenyy") == 0 and substring_distance("open", "opxn") == 1
    assert text_recall(["OPEN now"], "big sale OPENNOW") == 1.0
    assert text_recall(["abcd"], "") == 0.0 and text_recall(["abcd"], "abxd") == 0.75


def test_ocr_reads_rendered_text():
    from PIL import Image, ImageDraw, ImageFont

    def render(text: str) -> np.ndarray:
        img = Image.new("RGB", (320, 96), (255, 255, 255))
        ImageDraw.Draw(img).text((12, 28), text, fill=(0, 0, 0), font=ImageFont.load_default(size=30))
        return np.asarray(img)

    r = build("ocr", {})
    blank = np.full((96, 320, 3), 255, np.uint8)
    prompt = 'a shop sign that says "OPEN 24 HOURS"'
    s = r(np.stack([render("OPEN 24 HOURS"), render("OPEN 2 HOUR"), blank]), [prompt] * 3)
    assert s[0] == 1.0 and 0.6 < s[1] < 1.0 and s[2] == 0.0
    with pytest.raises(ValueError, match="quotes no text"):
        r(blank[None], ["a shop sign"])


def test_image_forms():
    u8 = _images(2, 8, 6)
    f_chw = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255
    for form in (u8, list(u8), f_chw, f_chw.numpy().transpose(0, 2, 3, 1)):
        out = as_uint8_images(form)
        assert len(out) == 2 and all(np.array_equal(a, b) for a, b in zip(out, u8, strict=True))
    # the digits backend's grey batch [N, 8, 8] in [0, 1]: the http reward and the docs' own reward
    # template refused it ("images must be a batch"), after training had started
    grey = np.linspace(0, 1, 2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8)
    out = stack_uint8(grey)
    assert out.shape == (2, 8, 8, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], np.round(grey * 255).astype(np.uint8)) and (out[..., 1] == out[..., 2]).all()
    with pytest.raises(ValueError, match="non-finite"):
        as_uint8_images(np.full((1, 4, 4, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="uint8 or float"):
        as_uint8_images(np.zeros((1, 4, 4, 3), np.int32))


def test_generate_scores_the_same_reward_twice_as_two_columns():
    """`rollout.generate --score` keyed each reward by its name: a config with the same reward
    twice (different kwargs) printed one column, and a total of the second one's scores counted
    under both weights, not the evaluation's."""
    from common.config import load_config
    from rollout.generate import score

    neg = "tests.integration.rewards_for_tests:NegativeNorm"
    cfg = load_config(
        ["--config", str(REPO / "configs" / "toy.yaml")],
        rewards=[{"name": neg}, {"name": neg, "kwargs": {"scale": 10.0}, "weight": 0.5}],
    )
    images = {"learned": np.array([[3.0, 4.0], [0.0, 1.0]])}
    got = score(cfg, None, ["class 1", "class 2"], np.zeros((2, 2)), images)["learned"]
    assert list(got) == [f"{neg}#0", f"{neg}#1", "reward"]
    assert got[f"{neg}#0"].tolist() == [-5.0, -1.0] and got[f"{neg}#1"].tolist() == [-50.0, -10.0]
    assert got["reward"].tolist() == [-30.0, -6.0]
