"""bench/se_calibration.py on a small budget: the clustered standard error is honest in size, and
at 10 prompts +- 1.96 s.e. holds the truth less often than 95% where +- t(9) s.e. holds it about
as often; the FD's +- is measured against its spread over fresh noises."""

from __future__ import annotations

import pytest

from tests.conftest import load_bench


def test_the_clustered_standard_error_reads_against_t():
    bench = load_bench("se_calibration.py")
    r = bench.clustered_mean(prompts=10, noises=20, replicates=2000, seed=1)
    assert r["se / spread"] == pytest.approx(1.0, abs=0.06)
    assert r["t"] == pytest.approx(2.262, abs=1e-3)
    assert 0.89 <= r["within 1.96 s.e."] <= 0.94  # the normal reading overstates: about 92%
    assert 0.935 <= r["within t s.e."] <= 0.965
    few = bench.clustered_mean(prompts=2, noises=20, replicates=2000, seed=1)
    assert few["within 1.96 s.e."] < 0.8 and few["within t s.e."] > 0.93


def test_the_fd_noise_is_measured_against_fresh_noises_on_the_trained_digits():
    bench = load_bench("se_calibration.py")
    r = bench.frechet(replicates=4, noises=6)
    for key in ("default", "other", "difference"):
        assert r[f"{key}: spread"] > 0 and r[f"{key}: +- / spread"] > 0, key
    assert r["default: FD"] != r["other: FD"]
