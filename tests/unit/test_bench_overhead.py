"""bench/overhead.py on a tiny budget: the real loop on the simulated backend, its table, PNG and
last line, with figures that make sense (the wall is never below the sampler's own time)."""

from __future__ import annotations

import pytest

from tests.conftest import load_bench

pytestmark = pytest.mark.ray


def test_overhead_bench_runs_the_real_loop(ray_local, tmp_path, capsys):
    bench = load_bench("overhead.py")
    rows = bench.main(
        [
            "--workers",
            "1",
            "2",
            "--iterations",
            "4",
            "--preset",
            "tiny",
            "--image-size",
            "16",
            "--seconds-per-image-step",
            "0.01",
            "--reward-seconds-per-image",
            "0.0",
            "--contexts",
            "4",
            "--png",
            str(tmp_path / "overhead.png"),
            "--json",
            str(tmp_path / "rows.json"),
        ]
    )
    out = capsys.readouterr().out
    assert [r.workers for r in rows] == [1, 2] and all(r.iterations == 3 for r in rows)
    assert rows[0].ideal_s == pytest.approx(4 * 2 * 5 * 0.01) and rows[1].ideal_s == pytest.approx(2 * 2 * 5 * 0.01)
    for r in rows:
        assert r.ratio >= 0.95 and 0 < r.learner_share < 1 and r.broadcast_mb > 0 and r.dispatch_skew_s >= 0
        assert 0 <= r.scoring_overlap <= 1 and r.outside_learner < r.ratio and r.reward_servers == 1
        assert 0 <= r.scoring_tail_s < r.wall_s and 0 <= r.collect_latency_s < r.wall_s
        assert 0 < r.weights_load_s < r.wall_s  # on policy every iteration's version is new to the workers
        assert r.pipelined_ratio is not None and r.pipelined_ratio >= 0.95
    assert "one step off: wall / ideal" in out
    assert (tmp_path / "overhead.png").stat().st_size > 0 and (tmp_path / "rows.json").exists()
    assert out.strip().splitlines()[-1] == f"overhead ratio at 2 workers: {rows[-1].ratio:.3f}"
