"""The fixed cost of one iteration where sampling costs nothing: the toy (configs/toy.yaml: C = 16,
K = 2, two workers; its sampler is about 0.4 ms of an iteration), run for ``--iterations`` with no
global baseline, plots or progress bar: the wall time from one iteration's metrics row to the
next (everything the loop does: dispatch, update, broadcast, logging, the rollout log), mean
and median after ``--skip`` warm-up iterations.

    cd <repo> && python bench/fixed_cost.py                     # about 30 s on 2 cores
    python bench/fixed_cost.py --pipeline                       # one step off policy (learner.pipeline)
    cd ../other-checkout && python ../steinsched/bench/fixed_cost.py --repo .   # another checkout's code
    python bench/fixed_cost.py --against ../other-checkout --against-python ../other-venv/bin/python --rounds 5

Another checkout runs in an environment where it is the installed one (``python -m venv
--system-site-packages``, then ``pip install --no-deps -e .``): an editable install of this
checkout would otherwise be what the Ray workers import.

``--against`` compares two checkouts in one run: ``--rounds`` runs of each, in turns (this one
first in odd rounds, the other in even ones), each in a process of its own and its own
environment's Python; ``--pipeline`` is this checkout's mode, ``--against-pipeline`` the
other's. On a shared machine of few cores an iteration's time drifts by a third
within minutes, so only figures taken in turns compare; it prints each round's medians and their
ratio, and last ``fixed cost ratio (this / against): X (rounds A to B)``, the ratio of the
medians over the rounds.

Everything but the sampler is overhead here: the dispatch (two Ray round trips per request:
sample, then score), the workers' policy forward and draws, the update, the weight broadcast and
the logging; one step off policy the update and the broadcast run while the next rollouts are
sampled and scored. The wall time is taken from outside, when each training row reaches
metrics.jsonl, so that a checkout whose ``system/step_seconds`` left the logging out is
measured the same way. It also prints where the CPU went (Linux: /proc), in ms per iteration
over the same iterations, by process (the learner, the workers, the reward server, Ray's own):
on a machine of few cores the loop is bound by the sum of it, not by any one hop. The last line
is ``fixed cost per iteration: X ms`` (the mean).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROC = Path("/proc")


def process_name(cmdline: list[str]) -> str:
    """A short name for a process from its command line: a Ray actor's class
    (``ray::RolloutWorker.sample`` -> RolloutWorker), else the script's or the program's file name."""
    if not cmdline:
        return "?"
    if cmdline[0].startswith("ray::"):
        return cmdline[0][5:].split(".")[0]
    scripts = [a for a in cmdline[1:] if a.endswith(".py")] if Path(cmdline[0]).name.startswith("python") else []
    return Path(scripts[0] if scripts else cmdline[0]).name


def cpu_seconds(root: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of ``root`` and every process below it, by pid, with
    ``process_name``; empty where there is no /proc."""
    if not PROC.is_dir():
        return {}
    ticks = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[str, float]] = {}
    parent: dict[int, int] = {}
    for d in PROC.glob("[0-9]*"):
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()  # after the command's name
            cmdline = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone meanwhile
            continue
        pid = int(d.name)
        parent[pid] = int(fields[1])
        stats[pid] = (process_name([a for a in cmdline if a]), (int(fields[11]) + int(fields[12])) / ticks)

    def below(pid: int) -> bool:
        while pid != root and pid in parent and pid > 1:
            pid = parent[pid]
        return pid == root

    return {pid: stat for pid, stat in stats.items() if below(pid)}


def cpu_table(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], iterations: int
) -> tuple[list[str], float]:
    """Milliseconds of CPU per iteration by process name (with how many processes share it) and
    in all, between two ``cpu_seconds`` snapshots, over the processes alive at the second; the
    learner is this process. Returns the table's lines and the total."""
    by_name: dict[str, list[float]] = {}
    for pid, (name, secs) in after.items():
        name = "learner (this process)" if pid == os.getpid() else name
        by_name.setdefault(name, []).append(1000 * (secs - before.get(pid, (name, 0.0))[1]) / iterations)
    lines = ["| process | CPU ms per iteration |", "| --- | --- |"]
    for name, ms in sorted(by_name.items(), key=lambda kv: -sum(kv[1])):
        if sum(ms) >= 0.05:
            lines.append(f"| {name}{f' ({len(ms)} processes)' if len(ms) > 1 else ''} | {sum(ms):.1f} |")
    total = sum(sum(ms) for ms in by_name.values())
    return [*lines, f"| all | {total:.1f} |"], total


def run_for(script: Path, pattern: str) -> Callable[[str, Path, list[str]], float]:
    """One run of the bench ``script`` on a checkout in a process of its own, as ``compare`` takes
    it: (the Python of the checkout's environment, its path, the script's arguments) -> the
    figure that ``pattern``'s group reads off its output."""

    def run(python: str, repo: Path, args: list[str]) -> float:
        cmd = [python, str(script), "--repo", str(repo), *args]
        out = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, check=False)
        found = re.search(pattern, out.stdout, re.M)
        if out.returncode != 0 or found is None:
            tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-5:])
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {out.returncode}):\n{tail}")
        return float(found.group(1))

    return run


#: One run of this bench: its median wall time per iteration (ms).
run_median = run_for(Path(__file__).resolve(), r"^wall per iteration\s+([\d.]+) ms \(median\)$")


Side = tuple[str, Path, list[str]]  # a checkout to run: the Python of its environment, its path, the bench's arguments


def compare(this: Side, other: Side, rounds: int, run=run_median, what: str = "fixed cost", unit: str = "ms") -> float:
    """``rounds`` runs of each checkout, (python, repo, its arguments), in turns; prints each round
    and returns the ratio of the medians, this one over the other (``run`` gives one run's figure
    of ``what``, in ``unit``)."""
    print(f"| round | this ({unit}) | against ({unit}) | this / against |")
    print("| --- | --- | --- | --- |")
    mine, theirs = [], []
    for r in range(rounds):
        got = [0.0, 0.0]
        for i in (0, 1) if r % 2 == 0 else (1, 0):  # each goes first as often
            got[i] = run(*(this, other)[i])
        mine.append(got[0])
        theirs.append(got[1])
        print(f"| {r + 1} | {got[0]:.2f} | {got[1]:.2f} | {got[0] / got[1]:.2f} |", flush=True)
    ratio = statistics.median(mine) / statistics.median(theirs)
    each = [a / b for a, b in zip(mine, theirs, strict=True)]
    print(f"medians: this {statistics.median(mine):.2f} {unit}, against {statistics.median(theirs):.2f} {unit}")
    print(f"{what} ratio (this / against): {ratio:.2f} (rounds {min(each):.2f} to {max(each):.2f})")
    return ratio


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(prog="python bench/fixed_cost.py", description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--skip", type=int, default=20, help="Warm-up iterations left out of the mean.")
    p.add_argument("--repo", type=Path, default=REPO, help="The checkout to measure (its code and configs).")
    p.add_argument("--pipeline", action="store_true", help="One step off policy (learner.pipeline=true).")
    p.add_argument("--against", type=Path, help="Another checkout, measured in turns with this one.")
    p.add_argument(
        "--against-python", default=sys.executable, help="The Python of the environment --against is installed in."
    )
    p.add_argument("--rounds", type=int, default=3, help="Runs of each checkout with --against.")
    p.add_argument("--against-pipeline", action="store_true", help="--against one step off policy.")
    args = p.parse_args(argv)
    if args.against is not None:
        both = ["--iterations", str(args.iterations), "--skip", str(args.skip)]
        return compare(
            (sys.executable, args.repo.resolve(), both + ["--pipeline"] * args.pipeline),
            (args.against_python, args.against.resolve(), both + ["--pipeline"] * args.against_pipeline),
            args.rounds,
        )
    repo = str(args.repo.resolve())
    sys.path.insert(0, repo)  # this process and, through PYTHONPATH, the Ray workers import that checkout
    os.environ["PYTHONPATH"] = os.pathsep.join([repo, *filter(None, [os.environ.get("PYTHONPATH")])])
    import numpy as np

    from common.config import load_config
    from learner import metrics
    from learner.loop import train
    from learner.metrics import read_jsonl

    stamps: list[float] = []  # when each training row was written (any checkout's JsonlLogger)
    cpu: list[dict[int, tuple[str, float]]] = []  # at the first measured row and the last
    write = metrics.JsonlLogger.log

    def stamped(self, step: int, row: dict[str, float]) -> None:
        write(self, step, row)
        if "system/step_seconds" in row:
            stamps.append(time.perf_counter())
            if len(stamps) in (args.skip + 1, args.iterations):
                cpu.append(cpu_seconds(os.getpid()))

    metrics.JsonlLogger.log = stamped  # type: ignore[method-assign]

    with tempfile.TemporaryDirectory(prefix="steinsched-fixed-") as out:
        cfg = load_config(
            [
                "--config",
                str(args.repo / "configs" / "toy.yaml"),
                f"--learner.iterations={args.iterations}",
                f"--experiment.output_dir={out}",
                "--learner.global_baseline=false",
                "--learner.progress=false",
                "--learner.plots=false",
                "--ray.num_cpus=2",
                f"--learner.checkpoint_every={args.iterations}",
                *(["--learner.pipeline=true"] if args.pipeline else []),
            ]
        )
        try:
            train(cfg, final_eval=False)
        finally:
            metrics.JsonlLogger.log = write  # type: ignore[method-assign]
        rows = [m for m in read_jsonl(cfg.run_dir / "metrics.jsonl") if "system/step_seconds" in m][args.skip :]
    for key in ("system/step_seconds", "system/learner_seconds", "rollout/worker_seconds", "system/broadcast_seconds"):
        if key in rows[0]:
            print(f"{key:<28} {1000 * float(np.mean([m[key] for m in rows])):8.2f} ms (mean)")
    wall = 1000 * np.diff(stamps)[args.skip :]
    if len(cpu) == 2 and cpu[1]:
        table, every = cpu_table(cpu[0], cpu[1], len(wall))
        print("\n".join(table))
        print(f"CPU used: {every / float(wall.mean()):.2f} cores of {os.cpu_count()}")
    print(f"{'wall per iteration':<28} {float(np.median(wall)):8.2f} ms (median)")
    print(f"fixed cost per iteration: {float(wall.mean()):.1f} ms")
    return float(wall.mean())


if __name__ == "__main__":
    main()
