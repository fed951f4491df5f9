"""bench/learner_step.py on a tiny budget: its figures exist and make sense (a half-precision
broadcast is half the bytes) and its last line names the step time."""

from __future__ import annotations

from tests.conftest import load_bench


def test_learner_step_bench_measures_step_forward_and_broadcast(capsys):
    bench = load_bench("learner_step.py")
    out = bench.main(["--preset", "tiny", "--contexts", "4", "--repeats", "1", "--threads", "1", "--device", "cpu"])
    assert out["parameters"] > 1e6  # configs/flux_dev_hps.yaml's policy widths
    assert out["step_s"] > 0 and out["forward_s"] > 0
    assert out["adamw_flat_s"] > 0 and out["adamw_per_tensor_s"] > 0
    assert out["broadcast_bfloat16_bytes"] * 2 == out["broadcast_float32_bytes"] == out["broadcast_float16_bytes"] * 2
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"learner step at C=4, K=2 on cpu: {out['step_s']:.3f} s"
