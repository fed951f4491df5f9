"""What a run costs besides its iterations: ``python -m learner.main --config configs/toy.yaml``
(the global baseline, then the policy) on a tiny budget, as a user starts it, measured from
outside: the wall time, the actors started (by class) and the CPU seconds of every process of
the run (Linux: /proc), by class. On the toy an iteration is milliseconds, so nearly all of it is
startup: Python and torch in each actor, the samplers, the rewards, Ray itself.

    cd <repo> && python bench/startup.py                        # about 40 s on 2 cores
    python bench/startup.py --against ../other-checkout --against-python ../other-venv/bin/python --rounds 3

``--against`` compares two checkouts in one run, in turns, each in its own environment (as in
bench/fixed_cost.py, whose turns this reuses); it prints each round's CPU seconds and last
``startup CPU ratio (this / against): X (rounds A to B)``. Alone, the last line is
``startup: N actors, X CPU s, Y s wall``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixed_cost import compare, cpu_seconds, run_for  # noqa: E402 - bench/ is a folder of scripts

REPO = Path(__file__).resolve().parents[1]
ACTOR_CLASSES = ("RolloutWorker", "RewardServer", "MetricServer")


def measure(
    repo: Path, iterations: int, poll_s: float = 0.1, cmd: list[str] | None = None
) -> tuple[float, dict[str, list[float]]]:
    """One tiny toy run of ``repo``'s entry point (or ``cmd``): its wall time and, by process name,
    the CPU seconds of it and of each process below it (the last reading before each ended)."""
    with tempfile.TemporaryDirectory(prefix="steinsched-startup-") as out:
        cmd = cmd or [
            sys.executable,
            "-m",
            "learner.main",
            "--config",
            "configs/toy.yaml",
            f"--experiment.output_dir={out}",
            f"--learner.iterations={iterations}",
            f"--learner.checkpoint_every={iterations}",
            "--learner.eval_seeds=2",
            "--learner.plots=false",
            "--learner.progress=false",
            "--ray.num_cpus=2",
        ]
        env = {**os.environ, "PYTHONPATH": str(repo)}
        env.pop("RAY_ADDRESS", None)  # a cluster of its own, as `python -m learner.main` starts
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen: dict[int, tuple[str, float]] = {}
        while proc.poll() is None:
            for pid, (name, secs) in cpu_seconds(proc.pid).items():
                known = seen.get(pid)
                if known is not None and name == "?":  # ending: its command line is gone, its name is not
                    name = known[0]
                seen[pid] = (name, max(secs, known[1] if known else 0.0))
            time.sleep(poll_s)
        wall = time.perf_counter() - t0
        output = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-5:])
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
    by_name: dict[str, list[float]] = {}
    for pid, (name, secs) in seen.items():
        by_name.setdefault("entry point" if pid == proc.pid else name, []).append(secs)
    return wall, by_name


def report(wall: float, by_name: dict[str, list[float]]) -> float:
    """Prints the table and the last line; returns the CPU seconds of the whole run."""
    print("| process | processes | CPU s | CPU s each |")
    print("| --- | --- | --- | --- |")
    for name, secs in sorted(by_name.items(), key=lambda kv: -sum(kv[1])):
        if sum(secs) >= 0.05:
            print(f"| {name} | {len(secs)} | {sum(secs):.1f} | {sum(secs) / len(secs):.2f} |")
    total = sum(sum(s) for s in by_name.values())
    actors = sum(len(by_name.get(c, [])) for c in ACTOR_CLASSES)
    print(f"startup: {actors} actors, {total:.1f} CPU s, {wall:.1f} s wall")
    return total


#: One run of this bench: the CPU seconds of the whole run.
run_cpu = run_for(Path(__file__).resolve(), r"^startup: \d+ actors, ([\d.]+) CPU s")


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(prog="python bench/startup.py", description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=2, help="Iterations of each policy (the global one, the run's).")
    p.add_argument("--repo", type=Path, default=REPO, help="The checkout to measure (its code and configs).")
    p.add_argument("--against", type=Path, help="Another checkout, measured in turns with this one.")
    p.add_argument(
        "--against-python", default=sys.executable, help="The Python of the environment --against is installed in."
    )
    p.add_argument("--rounds", type=int, default=3, help="Runs of each checkout with --against.")
    args = p.parse_args(argv)
    if args.against is not None:
        both = ["--iterations", str(args.iterations)]
        return compare(
            (sys.executable, args.repo.resolve(), both),
            (args.against_python, args.against.resolve(), both),
            args.rounds,
            run=run_cpu,
            what="startup CPU",
            unit="CPU s",
        )
    return report(*measure(args.repo.resolve(), args.iterations))


if __name__ == "__main__":
    main()
