"""HPS parity: our open_clip HPS equals the `hpsv2` package's own scoring code to 1e-5.

The reference (tests/fixtures/hps/scores.json) was made once with hpsv2 1.2.0 in a separate
virtualenv by tests/fixtures/hps/make_fixture.py, on a tiny ViT-H-14-layout architecture with
random weights saved in the HPS checkpoint layout.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from rewards.hps import HPSReward, preprocess
from rewards.images import downscale
from rewards.registry import build
from tests.fixtures.hps.make_fixture import make_images

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hps"


@pytest.fixture(scope="module")
def tiny_hps():
    return build(
        "hps", {"checkpoint": str(FIXTURE / "tiny-hps.pt"), "arch": str(FIXTURE / "tiny-hps.json"), "batch_size": 3}
    )


def test_scores_equal_hpsv2_reference(tiny_hps):
    ref = json.loads((FIXTURE / "scores.json").read_text())
    images = make_images()
    assert [list(a.shape[:2]) for a in images] == ref["sizes"]
    pairs = [(img, p) for p in ref["prompts"] for img in images]
    scores = tiny_hps([a for a, _ in pairs], [p for _, p in pairs])  # mixed sizes, batches of 3
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, np.array(ref["scores"]).ravel(), atol=1e-5, rtol=0)
    # the cache served every repeat of a prompt; cached and uncached features agree
    assert tiny_hps.text_features.misses == len(ref["prompts"])
    again = tiny_hps(images[:2], ref["prompts"][:2])
    np.testing.assert_allclose(again, [ref["scores"][0][0], ref["scores"][1][1]], atol=1e-5, rtol=0)


def test_float_chw_images_score_as_their_uint8_form(tiny_hps):
    img = make_images()[3]
    as_float = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    a = tiny_hps(img[None], ["abstract painting"])
    b = tiny_hps(as_float[None], ["abstract painting"])
    assert a == pytest.approx(b, abs=1e-7)


def test_preprocess_pads_to_a_centred_square():
    x = preprocess(np.full((112, 56, 3), 255, np.uint8))
    assert x.shape == (3, 224, 224)
    # longer side 112 -> 224, shorter 56 -> 112, padded 56 px each side with zeros (then normalised)
    col = x[0, 100]
    assert torch.allclose(col[:56], col[0]) and torch.allclose(col[-56:], col[0])
    assert not torch.isclose(col[100], col[0])
    # an image whose longer side is already 224 is padded too (hpsv2 would skip the pad and fail)
    assert preprocess(np.zeros((224, 100, 3), np.uint8)).shape == (3, 224, 224)


def test_images_downscaled_on_the_worker_score_as_the_full_images():
    """A worker sends a 1024² image at HPS's input size (rewards.images.downscale, the same
    bicubic antialiased resize): what HPS reads differs only by the uint8 rounding of the smaller
    image (one grey level in [0, 1], under 0.02 after CLIP's normalisation)."""
    rng = np.random.default_rng(0)
    smooth = torch.nn.functional.interpolate(
        torch.rand(1, 3, 16, 8, generator=torch.Generator().manual_seed(0)), (1024, 512), mode="bilinear"
    )
    full = (smooth[0].permute(1, 2, 0).numpy() * 200 + rng.integers(0, 40, (1024, 512, 3))).astype(np.uint8)
    small = downscale(full[None], 224)[0]
    assert small.shape == (224, 112, 3) and small.dtype == np.uint8
    a, b = preprocess(full), preprocess(small)
    assert (a - b).abs().max() < 0.02 + 1 / 255 / 0.26


def test_missing_checkpoint_and_bad_checkpoint_are_clear(tmp_path):
    arch = str(FIXTURE / "tiny-hps.json")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        HPSReward(checkpoint=str(tmp_path / "nope.pt"), arch=arch)
    torch.save({"state_dict": {"visual.proj": torch.zeros(2)}}, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match="Missing key"):
        HPSReward(checkpoint=str(tmp_path / "bad.pt"), arch=arch)


def test_no_random_init_warning_where_the_checkpoint_is_loaded(caplog):
    """open_clip warns "Model initialized randomly" for a model built without its weights: on every
    HPS run's terminal that was wrong, as the checkpoint is loaded right after; with
    ``random_weights`` it is true and stays."""
    arch = str(FIXTURE / "tiny-hps.json")
    with caplog.at_level(logging.WARNING):
        HPSReward(checkpoint=str(FIXTURE / "tiny-hps.pt"), arch=arch)
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    with caplog.at_level(logging.WARNING):
        HPSReward(arch=arch, random_weights=True)
    assert [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    assert not [f for f in logging.getLogger().filters if "RandomInit" in type(f).__name__], "the filter is removed"
