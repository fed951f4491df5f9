"""bench/fixed_cost.py: the toy's fixed cost per iteration, and where the CPU went by process."""

from __future__ import annotations

import os
import re

import pytest

from tests.conftest import load_bench


def test_processes_are_named_by_actor_class_or_script():
    bench = load_bench("fixed_cost.py")
    assert bench.process_name(["ray::RolloutWorker.sample"]) == "RolloutWorker"
    assert bench.process_name(["ray::RewardServer"]) == "RewardServer"
    assert bench.process_name(["/usr/bin/python3.11", "-u", "/x/log_monitor.py", "--a"]) == "log_monitor.py"
    assert bench.process_name(["/x/ray/core/src/ray/raylet/raylet", "--raylet_socket_name=s"]) == "raylet"
    assert bench.process_name([]) == "?"


def test_cpu_table_sums_each_name_per_iteration():
    bench = load_bench("fixed_cost.py")
    me = os.getpid()
    before = {me: ("python", 1.0), 11: ("RolloutWorker", 2.0), 12: ("RolloutWorker", 2.0), 13: ("raylet", 0.5)}
    after = {me: ("python", 1.5), 11: ("RolloutWorker", 2.2), 12: ("RolloutWorker", 2.3), 13: ("raylet", 0.5)}
    after[14] = ("RewardServer", 0.1)  # started in between: all its time counts
    table, total = bench.cpu_table(before, after, iterations=10)
    assert table[2:] == [
        "| learner (this process) | 50.0 |",
        "| RolloutWorker (2 processes) | 50.0 |",
        "| RewardServer | 10.0 |",
        "| all | 110.0 |",
    ]  # the raylet used nothing: left out of the rows, not of the sum
    assert total == pytest.approx(110.0)


def test_cpu_seconds_sees_this_process_and_its_children():
    bench = load_bench("fixed_cost.py")
    if not bench.PROC.is_dir():
        pytest.skip("no /proc")
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        seen = bench.cpu_seconds(os.getpid())
        assert os.getpid() in seen and child.pid in seen and seen[os.getpid()][1] > 0
        assert all(pid == os.getpid() or pid > 1 for pid in seen)
    finally:
        child.kill()
        child.wait()


@pytest.mark.ray
def test_fixed_cost_bench_runs_the_toy_and_splits_its_cpu(ray_local, capsys, monkeypatch):
    import sys

    from learner.metrics import JsonlLogger

    bench = load_bench("fixed_cost.py")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the bench points both at the checkout it measures
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    log = JsonlLogger.log
    ms = bench.main(["--iterations", "12", "--skip", "3"])
    out = capsys.readouterr().out
    assert ms > 0 and out.splitlines()[-1] == f"fixed cost per iteration: {ms:.1f} ms"
    rows = dict(re.findall(r"^\| (.+?) \| ([\d.]+) \|$", out, re.M))
    assert float(rows["learner (this process)"]) > 0
    # the toy's two workers, and any actor of an earlier test's run still alive on the shared cluster
    workers = [(k, float(v)) for k, v in rows.items() if re.fullmatch(r"RolloutWorker \((\d+) processes\)", k)]
    assert len(workers) == 1 and int(re.findall(r"\d+", workers[0][0])[0]) >= 2 and workers[0][1] > 0, rows
    assert float(rows["all"]) >= float(rows["learner (this process)"])
    assert re.search(r"^CPU used: [\d.]+ cores of \d+$", out, re.M)
    assert JsonlLogger.log is log  # its timing hook is taken off again


def test_against_runs_both_checkouts_in_turns_and_prints_the_ratio_of_medians(capsys, tmp_path):
    bench = load_bench("fixed_cost.py")
    this, other = ("py-a", tmp_path / "a", ["--pipeline"]), ("py-b", tmp_path / "b", [])
    times = {"py-a": iter([20.0, 22.0, 30.0]), "py-b": iter([40.0, 40.0, 41.0])}
    calls = []

    def run(python, repo, args):
        calls.append((python, repo, args))
        return next(times[python])

    ratio = bench.compare(this, other, 3, run=run)
    assert [c[0] for c in calls] == ["py-a", "py-b", "py-b", "py-a", "py-a", "py-b"]  # each first in turn
    assert all(c[1:] == (tmp_path / "a", ["--pipeline"]) for c in calls if c[0] == "py-a")
    assert all(c[1:] == (tmp_path / "b", []) for c in calls if c[0] == "py-b")
    assert ratio == pytest.approx(22.0 / 40.0)
    out = capsys.readouterr().out.splitlines()
    assert out[2:5] == ["| 1 | 20.00 | 40.00 | 0.50 |", "| 2 | 22.00 | 40.00 | 0.55 |", "| 3 | 30.00 | 41.00 | 0.73 |"]
    assert out[-1] == "fixed cost ratio (this / against): 0.55 (rounds 0.50 to 0.73)"


def test_a_run_that_fails_says_which_and_how(tmp_path):
    import sys

    bench = load_bench("fixed_cost.py")
    said = r"--nonsense failed \(exit 2\):\n(.*\n)*.*unrecognized arguments: --nonsense$"  # the command, its last lines
    with pytest.raises(RuntimeError, match=said):
        bench.run_median(sys.executable, tmp_path, ["--nonsense"])
