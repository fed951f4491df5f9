"""bench/startup.py: a run's CPU by process from outside, and its report."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, load_bench


def test_the_cpu_of_the_command_and_of_each_process_below_it_is_kept_after_they_end():
    bench = load_bench("startup.py")
    if not load_bench("fixed_cost.py").PROC.is_dir():
        pytest.skip("no /proc")
    # it spins 0.4 CPU s, then idles a second so that the poll reads its whole CPU on a busy machine
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\ntime.sleep(1.0)"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {spin!r}], check=True)"
    wall, by_name = bench.measure(REPO, 1, poll_s=0.05, cmd=[sys.executable, "-c", child])
    assert by_name.keys() == {"entry point", Path(sys.executable).name}
    (child_cpu,) = by_name[Path(sys.executable).name]  # one process, read until it ended
    assert 0.3 <= child_cpu < 2.0
    assert wall >= 1.4


def test_report_counts_actors_by_class_and_sums_every_process(capsys):
    bench = load_bench("startup.py")
    total = bench.report(
        12.5,
        {
            "entry point": [3.0],
            "RolloutWorker": [6.0, 5.0],
            "RewardServer": [1.5],
            "raylet": [0.5],
            "log_monitor.py": [0.01],
        },
    )
    out = capsys.readouterr().out.splitlines()
    assert out[2:6] == [
        "| RolloutWorker | 2 | 11.0 | 5.50 |",
        "| entry point | 1 | 3.0 | 3.00 |",
        "| RewardServer | 1 | 1.5 | 1.50 |",
        "| raylet | 1 | 0.5 | 0.50 |",
    ]  # under 0.05 s: left out of the rows, not of the sum
    assert out[-1] == "startup: 3 actors, 16.0 CPU s, 12.5 s wall"
    assert total == pytest.approx(16.01)


def test_against_compares_cpu_seconds_in_turns(capsys):
    bench = load_bench("startup.py")
    figures = iter([10.0, 20.0, 24.0, 12.0, 11.0, 22.0])  # this, other; other, this; this, other

    def run(python, repo, args):
        return next(figures)

    ratio = bench.compare(("p", REPO, []), ("q", REPO, []), 3, run=run, what="startup CPU", unit="CPU s")
    assert ratio == pytest.approx(11.0 / 22.0)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| round | this (CPU s) | against (CPU s) | this / against |"
    assert out[-1] == "startup CPU ratio (this / against): 0.50 (rounds 0.50 to 0.50)"
