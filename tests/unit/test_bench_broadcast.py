"""bench/broadcast.py on a tiny budget: both paths run on the real actors (the bench itself
checks that every worker read the version over the path measured), with a table and last line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import load_bench

TOY = str(Path(__file__).resolve().parents[2] / "configs" / "toy.yaml")

pytestmark = pytest.mark.ray


def test_broadcast_bench_measures_both_paths(ray_local, capsys):
    bench = load_bench("broadcast.py")
    rows = bench.main(["--workers", "2", "--dtypes", "bfloat16", "--repeats", "1", "--preset", "tiny", "--config", TOY])
    assert [(r["workers"], r["dtype"]) for r in rows] == [(2, "bfloat16")]
    assert rows[0]["mib"] > 0 and rows[0]["object_store"] > 0 and rows[0]["collective"] > 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "| workers | dtype | MiB | object store (s) | collective (s) | collective / object store |" in out
    ratio = rows[0]["collective"] / max(rows[0]["object_store"], 1e-9)
    assert out[-1] == f"collective / object store at 2 workers (bfloat16): {ratio:.2f}"
