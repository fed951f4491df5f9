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


@pytest.mark.parametrize(
    ("contexts", "workers", "micro_batch", "busiest"),
    [
        (32, 3, 2, 6.0),  # 16 requests of 2 over 3 workers: the first takes 6
        (32, 4, 3, 4.5),  # 11 requests of 3 (the last of 2): 3 on the first worker
        (32, 16, 3, 1.5),  # 11 requests, one each: 5 workers idle
        (32, 16, 4, 2.0),  # 8 requests of 4: half the workers idle
        (8, 4, 4, 2.0),
        (32, 12, 0, 1.5),  # evenly: 11 requests of 3, one worker idle
        (5, 2, 2, 1.5),  # requests of 2, 2, 1: the first worker samples the first and the last
        (2, 3, 0, 0.5),  # more workers than contexts
    ],
)
def test_the_ideal_is_the_busiest_workers_sampler_time_under_the_loops_split(contexts, workers, micro_batch, busiest):
    """The bench cut C as ceil(C / W) contexts per worker in ceil(that / m) calls; the loop cuts it
    into micro-batches dealt round robin, so with m > 1 the busiest worker had more than that."""
    bench = load_bench("overhead.py")
    k, steps, cost = 2, 5, 0.05  # 0.5 s a context
    assert bench.ideal_seconds(contexts, workers, micro_batch, k, steps, cost, 0.0) == pytest.approx(busiest)
    with_calls = bench.ideal_seconds(contexts, workers, micro_batch, k, steps, cost, 0.1)
    n = micro_batch or -(-contexts // workers)
    requests = -(-contexts // n)
    assert with_calls == pytest.approx(busiest + 0.1 * -(-requests // workers))


def test_too_few_iterations_or_cpus_are_refused_before_any_run(capsys):
    """With --iterations 2 the whole sweep ran, then failed on an empty mean with an IndexError."""
    bench = load_bench("overhead.py")
    for argv, said in [
        (["--iterations", "2"], "at least 3 are needed (or --no-pipeline)"),
        (["--iterations", "1", "--no-pipeline"], "at least 2 are needed"),
        (["--cpus", "0.4"], "give 1 or more"),
    ]:
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2 and said in capsys.readouterr().err


def test_the_paper_policy_is_the_flux_configs():
    """--policy paper builds configs/flux_dev_hps.yaml's policy: the paper's 20.3M parameters on Flux shapes."""
    import torch

    from common.config import load_config
    from common.policy import SchedulePolicy, policy_kwargs
    from rollout.backends.simulated import SimulatedSampler

    bench = load_bench("overhead.py")
    cfg = load_config([], policy=bench.paper_policy())
    sampler = SimulatedSampler(preset="flux")
    with torch.device("meta"):  # the shapes alone
        policy = SchedulePolicy(**policy_kwargs(cfg.policy, sampler.spec(), 5, sampler.default_tau(5)))
    assert 20.0e6 < sum(p.numel() for p in policy.parameters()) < 20.6e6
