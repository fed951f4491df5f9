"""bench/l_sweep.py's table: each method's row, then each run's paired rows (same prompts and
noises), which tell apart what the sets' +-s cannot."""

from __future__ import annotations

from tests.conftest import load_bench


def test_the_table_gives_each_runs_paired_rows_after_its_methods():
    bench = load_bench("l_sweep.py")
    sets = {name: {"mean": -1.0, "se": 0.1, "n": 40, "fd": 20.0, "fd_se": 0.9} for name in bench.METHODS}
    pair = {"mean": 0.5, "se": 0.02, "n": 40, "fd": -2.547, "fd_se": 0.0627}
    results = {2: {**sets, "learned instance-level - learned global": pair}, 4: sets}
    rows = bench.table(results).splitlines()
    assert rows[0] == "| L | method | reward (mean +- s.e.) | fd |"
    assert [r.split(" | ")[1] for r in rows[2:]] == [*bench.METHODS, "learned instance-level - learned global"] + list(
        bench.METHODS
    )
    assert rows[5] == "| 2 | learned instance-level - learned global | 0.5 +- 0.02 | -2.55 +- 0.063 |"
