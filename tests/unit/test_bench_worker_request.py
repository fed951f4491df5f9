"""bench/worker_request.py on a tiny budget: its figures exist, and its last line is the threads'
ratio."""

from __future__ import annotations

import pytest

from tests.conftest import load_bench


def test_worker_request_bench_measures_the_request_and_its_downscale(capsys):
    bench = load_bench("worker_request.py")
    out = bench.main(["--preset", "tiny", "--image-size", "512", "--reward-size", "64", "--policy", "small",
                      "--threads", "2", "--repeats", "3"])  # fmt: skip
    assert set(out) == {"request_ms", "request_downscaled_1_ms", "request_downscaled_threads_ms",
                        "downscale_1_ms", "downscale_threads_ms"} and all(v > 0 for v in out.values())  # fmt: skip
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"downscale on 2 threads / on 1: {out['downscale_threads_ms'] / out['downscale_1_ms']:.2f}"


def test_worker_request_bench_refuses_one_thread():
    bench = load_bench("worker_request.py")
    with pytest.raises(SystemExit):
        bench.main(["--threads", "1"])
