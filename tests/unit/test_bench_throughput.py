"""bench/rollout_throughput.py on a tiny budget: both paths make the same images, and a table prints."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _bench():
    name = "bench_rollout_throughput"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / "rollout_throughput.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_tiny_budget_same_images_and_a_ratio(capsys):
    rows = _bench().main(
        ["--families", "sd15", "flux", "--contexts", "2", "--k", "2", "--steps", "2", "--repeats", "1"]
    )
    assert [r["family"] for r in rows] == ["sd15", "flux"]
    for r in rows:
        assert r["images"] == 4 and r["max_diff"] <= 1e-4
        assert r["ratio"] > 0 and r["ours_ips"] > 0 and r["stock_ips"] > 0
    out = capsys.readouterr().out
    assert "ratio" in out and "sd15" in out and "flux" in out
