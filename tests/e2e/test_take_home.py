"""What a user takes home from a finished run, on a tiny digits run: ``python -m learner.evaluate``
reproduces the run's own held-out table and sweeps L with every method; ``python -m
rollout.generate`` makes the image of one held-out (prompt, seed) and scores it exactly as the
evaluation did; the pictures land in TensorBoard too."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import yaml

from common.config import load_config
from learner import evaluate as evaluate_cli
from learner.main import run
from rollout import generate as generate_cli
from tests.conftest import REPO, tiny_overrides

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def digits_run(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("take_home")
    over = tiny_overrides(
        out,
        sampler={"backend": "digits"},
        rollout={"steps": 3, "contexts_per_iter": 4},
        rewards=[{"name": "fidelity", "num_cpus": 0.5}],
        learner={
            "iterations": 3,
            "eval_seeds": 3,
            "global_baseline": True,
            "eval_metrics": [{"name": "digits_fd", "num_cpus": 0.25, "noise_resamples": 5}],
            "plots": True,
        },
    )
    cfg = load_config([], **over)
    run(cfg)
    return cfg.run_dir


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class _Bar:
    """tqdm's part that the evaluation uses, recorded."""

    made: list[_Bar] = []

    def __init__(self, total, **kwargs):
        self.total, self.n, self.kwargs, self.descriptions, self.closed = total, 0, kwargs, [], False
        _Bar.made.append(self)

    def update(self, n):
        self.n += n

    def set_description(self, text):
        self.descriptions.append(text)

    def close(self):
        self.closed = True


def test_evaluate_reproduces_the_run_and_sweeps_l(digits_run, tmp_path, capsys, monkeypatch):
    from learner.evaluate import MARK

    out = tmp_path / "ev"
    out.mkdir()
    (out / MARK).touch()  # an earlier evaluation's dir
    (out / "fidelity_vs_L.png").write_bytes(b"an earlier evaluation's plot, of a measure this one has not")
    monkeypatch.setattr("tqdm.auto.tqdm", _Bar)
    code = evaluate_cli.main(["--run", str(digits_run), "--steps", "2,3", "--best-of", "2", "--out", str(out)])
    assert code == 0
    assert not (out / "fidelity_vs_L.png").exists(), "it was left beside this evaluation's plots"
    # its progress (on a terminal): every sample counted as its unit is scored, 30 contexts x (2 at L=2, 6 at L=3)
    (bar,) = _Bar.made
    assert bar.n == bar.total == 30 * 8 and bar.closed and bar.descriptions == ["evaluate L=2", "evaluate L=3"]
    assert bar.kwargs["disable"] is None, "shown on a terminal only: a job's log is not filled with bars"
    summary = {(int(r["L"]), r["method"], r["measure"]): float(r["mean"]) for r in _rows(out / "summary.csv")}
    # the run's own final table (same contexts, same weights), to the last digit
    own = json.loads((digits_run / "eval.json").read_text())
    for method in ("default", "learned global", "learned instance-level"):
        assert summary[(3, method, "reward")] == own[method]["mean"], method
        assert summary[(3, method, "digits_fd")] == own[method]["digits_fd"], method
    # baselines at every L, learned rows (and the best of 2 draws) at the run's own L only
    for method in ("default", "uniform-in-t"):
        assert (2, method, "reward") in summary and (3, method, "reward") in summary
    assert (2, "learned instance-level", "reward") not in summary
    assert (3, "best of 2 (x2 NFE)", "reward") in summary and (2, "best of 2 (x2 NFE)", "reward") not in summary
    assert "AYS" not in {m for _, m, _ in summary}  # digits is a flow model: diffusers has no AYS for it
    table = (out / "table.md").read_text()
    assert "| method | L = 2 | L = 3 |" in table and "**digits_fd (lower better)**" in table
    assert (out / "reward_vs_L.png").stat().st_size > 0 and (out / "digits_fd_vs_L.png").stat().st_size > 0
    assert not (out / ".lock").exists(), "the evaluation dir is released"
    contexts = _rows(out / "contexts.csv")
    assert len(contexts) == 10 * 3 * (2 + 5)  # 10 prompts x 3 seeds; 2 methods at L=2, 5 at L=3
    # the evaluation's figure and the run's pictures are in TensorBoard's Images tab
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def images(tb):
        acc = EventAccumulator(str(tb), size_guidance={"images": 0})
        acc.Reload()
        return set(acc.Tags()["images"])

    assert {"pictures/schedules", "pictures/samples", "pictures/reward_curve"} <= images(digits_run / "tb")
    assert {"pictures/reward_vs_L", "pictures/digits_fd_vs_L"} <= images(digits_run / "tb" / "evaluation")


def test_generate_scores_a_held_out_context_as_the_evaluation_did(digits_run, tmp_path, capsys):
    out = tmp_path / "ev"
    assert evaluate_cli.main(["--run", str(digits_run), "--out", str(out)]) == 0
    rows = [r for r in _rows(out / "contexts.csv") if r["method"] == "learned instance-level"][:2]
    capsys.readouterr()
    for r in rows:
        png = tmp_path / f"{r['context']}.png"
        code = generate_cli.main(
            ["--run", str(digits_run), "--prompt", r["prompt"], "--seed", r["seed"], "--score", "--out", str(png)]
        )
        assert code == 0 and png.stat().st_size > 0
        line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("score learned"))
        got = float(line.rsplit("reward ", 1)[1])
        assert got == pytest.approx(float(r["reward"]), rel=1e-5, abs=1e-9)
    # a grid beside the default schedule, and a clear refusal of an L the policy was not trained for
    grid = tmp_path / "grid.png"
    args = ["--run", str(digits_run), "--prompt", "the digit 3", "--prompt", "a 5", "--seed", "0", "--seed", "1"]
    assert generate_cli.main([*args, "--compare", "--out", str(grid)]) == 0 and grid.stat().st_size > 0
    assert generate_cli.main([*args, "--steps", "8"]) == 2
    assert "trained for L=3" in capsys.readouterr().err
    assert generate_cli.main([*args, "--steps", "8", "--schedule", "default", "--out", str(grid)]) == 0


def test_careless_arguments_are_one_line_before_any_work(digits_run, tmp_path, capsys):
    """A prompt the backend cannot read, an output that cannot be written, a flag out of range:
    one line each (exit 2), and nothing evaluated or sampled first."""
    run = ["--run", str(digits_run)]

    def err_of(code):
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, err
        (line,) = err  # one line: no usage block before it
        return line

    # generate
    assert err_of(generate_cli.main([*run, "--prompt", "hello"])).startswith(
        "error: --prompt: digits prompt 'hello' names no digit"
    )
    assert err_of(generate_cli.main([*run, "--prompt", " "])).startswith("error: --prompt: prompts: prompt 1 is empty")
    assert err_of(generate_cli.main([*run, "--prompt", "7", "--out", str(tmp_path)])).startswith(
        f"error: --out {tmp_path} is a directory"
    )
    assert err_of(generate_cli.main([*run, "--prompt", "7", "--out", str(tmp_path / "seven.txt")])) == (
        f"error: --out {tmp_path / 'seven.txt'}: name a .png, .jpg, .jpeg file"
    )
    assert err_of(generate_cli.main([*run, "--prompt", "7", "--out", str(tmp_path / "no" / "seven.png")])) == (
        f"error: --out {tmp_path / 'no' / 'seven.png'}: the directory {tmp_path / 'no'} does not exist"
    )
    # a run whose model is neither here nor fetchable (its config.yaml edited: a copy of the run)
    moved = tmp_path / "moved"
    shutil.copytree(digits_run, moved)
    cfg = yaml.safe_load((moved / "config.yaml").read_text())
    cfg["sampler"].update(backend="sd", sd={"model": "steinsched-tests/no-such-model", "local_files_only": True})
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
    saved = json.loads((moved / "policy" / "config.json").read_text())
    (moved / "policy" / "config.json").write_text(json.dumps({**saved, "backbone": "sd"}))  # a policy for it
    assert err_of(generate_cli.main(["--run", str(moved), "--prompt", "7"])) == (
        "error: sampler model 'steinsched-tests/no-such-model' is neither a local path nor in the hub cache, and"
        " downloads are off (local_files_only, or HF_HUB_OFFLINE=1): give a local directory laid out as a diffusers"
        " pipeline (README: Real models and local weights)"
    )
    # --score with a reward that cannot start: its traceback, or one line only after sampling, no image written
    scored = tmp_path / "scored"
    shutil.copytree(digits_run, scored)
    png = tmp_path / "s.png"
    for reward, code, line in [
        ("FailsToStart", 2, "could not start: RuntimeError: no model at /models/x"),
        ("RaisesOnCall", 1, f"RuntimeError: deliberate failure; the image is in {png}"),
    ]:
        cfg = yaml.safe_load((digits_run / "config.yaml").read_text())
        cfg["rewards"] = [{"name": f"tests.integration.rewards_for_tests:{reward}"}]
        (scored / "config.yaml").write_text(yaml.safe_dump(cfg))
        got = generate_cli.main(["--run", str(scored), "--prompt", "7", "--score", "--out", str(png)])
        err = capsys.readouterr().err.strip().splitlines()
        assert got == code and len(err) == 1 and err[0].startswith("error: --score: ") and err[0].endswith(line), err
        assert png.exists() == (code == 1), "one that cannot start is found before sampling; one that fails keeps it"
    # a run whose tb/ cannot be written (a read-only share, another user's run): a traceback after the whole
    # evaluation, no plots; now a warning first, and everything else written
    shutil.rmtree(scored / "tb")
    (scored / "tb").write_text("not a directory")
    ev = tmp_path / "ev_ro"
    cfg["rewards"] = yaml.safe_load((digits_run / "config.yaml").read_text())["rewards"]
    (scored / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert evaluate_cli.main(["--run", str(scored), "--seeds", "2", "--out", str(ev)]) == 0
    assert f"warning: {scored / 'tb' / 'evaluation'} cannot be written (" in capsys.readouterr().out
    assert (ev / "table.md").exists() and list(ev.glob("*_vs_L.png"))
    # --checkpoint with --schedule global named the run's own policy's checkpoint, and was ignored silently
    assert err_of(generate_cli.main([*run, "--prompt", "7", "--schedule", "global", "--checkpoint", "latest"])) == (
        f"error: --checkpoint latest is of the policy {digits_run} trained; --schedule global uses its learned"
        f" global schedule: give --run {digits_run / 'global'} --checkpoint ... for one of that schedule's checkpoints"
    )
    png = tmp_path / "g.png"
    g_run = ["--run", str(digits_run / "global"), "--checkpoint", "latest"]
    assert generate_cli.main([*g_run, "--prompt", "7", "--schedule", "global", "--out", str(png)]) == 0
    assert png.stat().st_size > 0, "as the refusal says"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        generate_cli.main([*run, "--prompt", "7", "--seed", "-1"])
    assert err_of(e.value.code) == (
        "error: invalid command line: argument --seed: must be from 0 to 4611686018427387904, got -1"
        " (--help lists every flag)"
    )
    with pytest.raises(SystemExit) as e:
        generate_cli.main([*run, "--prompt", "7", "--steps", "0"])
    assert err_of(e.value.code).startswith(
        "error: invalid command line: argument --steps: must be from 1 to 1000, got 0"
    )
    # evaluate: flags checked by argparse, the output before the evaluation, the prompts before sampling
    for flag, value, why in [
        ("--steps", "2,a", "expected an integer, got 'a'"),
        ("--steps", "99999", "must be from 1 to 1000, got 99999"),
        ("--seeds", "0", "must be from 2 to 1000000, got 0"),
        ("--best-of", "-1", "must be from 2 to 1000, got -1"),
        ("--best-of", "1", "must be from 2 to 1000, got 1"),  # was accepted and left out of the table
        ("--best-of", "100000000", "must be from 2 to 1000, got 100000000"),  # ran, silent, 10^8 draws a context
        (
            "--out",
            "",
            "is blank (an unset variable in the command?): give a path, '.' for here",
        ),  # wrote into the current directory
        ("--run", " ", "is blank (an unset variable in the command?): give a path, '.' for here"),
    ]:
        with pytest.raises(SystemExit) as e:
            evaluate_cli.main([*run, flag, value])
        assert err_of(e.value.code).startswith(f"error: invalid command line: argument {flag}: {why} (")
    # a checkpoint of the run's global baseline: the workers' policy refused its weights, after Ray started
    global_ckpt = sorted((digits_run / "global" / "checkpoints").glob("ckpt-*"))[-1]
    assert err_of(evaluate_cli.main([*run, "--checkpoint", str(global_ckpt)])) == (
        f"error: checkpoint {global_ckpt} is not of the policy {digits_run} trained (its config differs in"
        " experiment.name, policy.variant): give --run the run it is of"
    )
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    # a path that is not a run: refused before anything is made in it (it was given tb/evaluation)
    for where in (tmp_path / "nowhere", a_file, digits_run / "policy"):
        assert err_of(evaluate_cli.main(["--run", str(where)])).startswith("error: ")
    assert not (tmp_path / "nowhere").exists() and not (digits_run / "policy" / "tb").exists()
    with pytest.raises(SystemExit) as e:
        generate_cli.main(["--run", str(digits_run), "--prompt", "7", "--out", ""])
    assert "argument --out: is blank" in err_of(e.value.code)
    # a damaged learned global schedule: one line (it was safetensors' traceback, in evaluate after Ray started)
    damaged = tmp_path / "damaged"
    shutil.copytree(digits_run, damaged)
    with open(damaged / "global" / "policy" / "model.safetensors", "r+b") as f:
        f.truncate(50)
    assert err_of(generate_cli.main(["--run", str(damaged), "--prompt", "7", "--schedule", "global"])).startswith(
        f"error: the policy in {damaged / 'global' / 'policy'} cannot be loaded (SafetensorError: "
    )
    assert err_of(evaluate_cli.main([*run, "--out", str(a_file)])) == (
        f"error: --out {a_file} is a file; the evaluation writes a directory"
    )
    # a directory of the user's own files: its table.md and CSVs were replaced and a plot of theirs deleted
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "table.md").write_text("my notes")
    (mine / "loss_vs_L.png").write_bytes(b"png")
    (mine / "notes.txt").write_text("mine")
    assert err_of(evaluate_cli.main([*run, "--out", str(mine)])) == (
        f"error: --out {mine} holds files no evaluation wrote (loss_vs_L.png, notes.txt, table.md): an evaluation"
        " writes table.md, summary.csv, contexts.csv and its plots there, replacing what it finds; give a new or an"
        " empty directory"
    )
    assert (mine / "table.md").read_text() == "my notes" and (mine / "loss_vs_L.png").read_bytes() == b"png"
    (mine / "notes.txt").unlink()  # an evaluation's names only, but no mark: one written before the mark, or not
    assert err_of(evaluate_cli.main([*run, "--out", str(mine)])) == (
        f"error: --out {mine} holds an evaluation's files (loss_vs_L.png, table.md) but not the mark an evaluation"
        " leaves (.steinsched-evaluation): one written before evaluations marked their dirs, or files of the same"
        " names; delete them, or give a new or an empty directory"
    )
    assert err_of(evaluate_cli.main([*run, "--out", str(a_file / "sub")])) == (
        f"error: --out {a_file / 'sub'}: {a_file} is a file, not a directory"
    )  # was NotADirectoryError's traceback, after the whole evaluation
    assert err_of(evaluate_cli.main([*run, "--out", "/proc/steinsched/ev"])).startswith(
        "error: --out /proc/steinsched/ev cannot be written: /proc: "
    )
    assert err_of(generate_cli.main([*run, "--prompt", "7", "--out", "/proc/self/seven.png"])) == (
        "error: --out /proc/self/seven.png cannot be written: No such file or directory"
    )  # was a traceback after sampling
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the digit 3\nhello world\n")
    out = tmp_path / "ev"
    assert err_of(evaluate_cli.main([*run, "--prompt-file", str(prompts), "--out", str(out)])) == (
        f"error: --prompt-file {prompts}: digits prompt 'hello world' names no digit; name one digit, e.g. 'a"
        " handwritten seven', 'the digit 7'"
        " or '7'"
    )
    assert not out.exists()
    assert err_of(evaluate_cli.main([*run, "--out", str(out), "--", "--rollout.steps=8"])) == (
        "error: --rollout.steps=8: the steps evaluated are --steps (e.g. --steps 2,4,8), not a config flag"
    )  # was ignored: the table at the run's own L, exit 0
    assert err_of(evaluate_cli.main([*run, "--out", str(out), "--", "--rollout={steps: 8, num_workers: 1}"])) == (
        "error: --rollout={steps: 8, num_workers: 1}: the steps evaluated are --steps (e.g. --steps 2,4,8), not a"
        " config flag"
    )
    assert err_of(evaluate_cli.main([*run, "--out", str(out), "--", "--rollout", "{steps: 8}"])) == (
        "error: --rollout {steps: 8}: the steps evaluated are --steps (e.g. --steps 2,4,8), not a config flag"
    )
    # the rollout workers may change, in a section's mapping as in its dotted flags (it was refused as the steps)
    assert evaluate_cli.main([*run, "--seeds", "2", "--out", str(out), "--", "--rollout={num_workers: 1}"]) == 0
    capsys.readouterr()
    shutil.rmtree(out)
    unread = ["--learner.lr=0.5", "--policy.groups=2", "--learner.eval_every=5"]
    assert err_of(evaluate_cli.main([*run, "--out", str(out), "--", *unread])) == (
        "error: policy.groups, learner.lr, learner.eval_every: an evaluation does not read them (how the run trained);"
        " it reads the"
        " sampler, the rewards, ray, the rollout workers, experiment.seed and learner.eval_*"
    )  # were ignored, silently
    assert err_of(evaluate_cli.main([*run, "--out", str(out), "--", "--sampler.backend=toy"])) == (
        "error: --sampler.backend=toy: the run's policy was trained for the digits backend, and reads its noise and"
        " prompts; an evaluation samples with it (its settings, sampler.digits.*, may change)"
    )  # was a reshape error's traceback from the metric server, after Ray and the workers had started
    assert err_of(evaluate_cli.main([*run, *run, "--out", str(out)])) == (
        "error: a run is given twice (--run): give each run once"
    )
    # an L that reaches the fidelity reward's 64-step reference: it scored a sample against itself, exit 0
    assert err_of(evaluate_cli.main([*run, "--steps", "4,64", "--seeds", "2", "--out", str(out)])) == (
        "error: --steps 64: reward 'fidelity' compares with the 64-step reference sample (rollout.reference_steps),"
        " which 64 steps reach: evaluate fewer steps than 64"
    )
    assert not out.exists()
    # runs of other references, one per L: each L's fidelity was against another reference, in one table
    other_ref = tmp_path / "other_ref"
    shutil.copytree(digits_run, other_ref)
    cfg = yaml.safe_load((other_ref / "config.yaml").read_text())
    cfg["rollout"]["reference_steps"] = 32
    (other_ref / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert err_of(evaluate_cli.main([*run, "--run", str(other_ref), "--out", str(out)])) == (
        f"error: {other_ref} differs from {digits_run} in its rollout.reference_steps: evaluate them apart"
    )
    assert err_of(evaluate_cli.main([*run, "--out", str(out), "--", "--rollout.kk=1"])) == (
        "error: invalid command line: unrecognized arguments: --rollout.kk=1 (--help lists every flag)"
    )
    # an --out another evaluation is writing (two people evaluating one run: both into runs/x/evaluation)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        host = socket.gethostname()
        (out / ".lock").write_text(json.dumps({"host": host, "pid": holder.pid, "started": "t"}))
        assert err_of(evaluate_cli.main([*run, "--out", str(out)])) == (
            f"error: evaluation dir {out} is in use by pid {holder.pid} on host {host} (since t); use another --out,"
            f" or delete {out / '.lock'} if that evaluation is gone"
        )  # both wrote table.md, the CSVs and the plots: the last writer's files, or a mix of the two
        assert json.loads((out / ".lock").read_text())["pid"] == holder.pid, "its owner's lock stays"
    finally:
        holder.kill()
        holder.wait()
    shutil.rmtree(out)
    # a reward that raises during the evaluation: one line, exit 1 (it was StepFailed's traceback)
    bad = "--rewards=[{name: 'tests.integration.rewards_for_tests:RaisesOnCall'}]"
    code = evaluate_cli.main([*run, "--seeds", "2", "--out", str(out), "--", bad])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and not out.exists(), err
    assert err[-1].startswith("error: reward 'tests.integration.rewards_for_tests:RaisesOnCall' raised ")
    assert err[-1].endswith("; the step stopped, nothing of it used") and "Traceback" not in "".join(err)


def test_an_evaluation_sent_sigterm_ends_in_one_line(digits_run, tmp_path):
    """SIGTERM (an evaluation job stopped) met Ray's handler: a stack dump from its C++ core and
    exit 134. Now it ends as on Ctrl-C: its actors and the Ray cluster it started stopped, one
    line, exit 143, nothing written."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a cluster of its own
    out = tmp_path / "ev"
    argv = ["--run", str(digits_run), "--out", str(out), "--", "--ray.num_cpus=2"]
    cmd = [sys.executable, "-m", "tests.integration.term_in_evaluate", *argv]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    text = res.stdout + res.stderr
    assert res.returncode == 143, text[-2000:]
    assert res.stderr.strip().splitlines()[-1] == "terminated: nothing of the evaluation was written"
    assert "SIGTERM received" not in text and "Traceback" not in text, text[-2000:]
    assert not out.exists()


def test_generate_on_a_backend_of_vectors_says_no_image_was_written(ray_local, digits_run, tmp_path, capsys):
    """The toy's samples are vectors: an --out was silently not written. A policy of another
    backend's run was a 27-line traceback from the sampler (generate), or the workers' failure
    after Ray started (evaluate)."""
    cfg = load_config([], **tiny_overrides(tmp_path, learner={"iterations": 1, "checkpoint_every": 1}))
    run(cfg)
    capsys.readouterr()
    out = tmp_path / "toy.png"
    assert generate_cli.main(["--run", str(cfg.run_dir), "--prompt", "class 1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == f"no image written to {out}: this backend's samples are vectors, printed above"
    assert not out.exists()
    mixed = tmp_path / "mixed"
    shutil.copytree(cfg.run_dir, mixed)
    shutil.rmtree(mixed / "policy")
    shutil.copytree(digits_run / "policy", mixed / "policy")
    why = f"error: the policy in {mixed / 'policy'} was trained for the digits backend; this run samples with toy"
    assert generate_cli.main(["--run", str(mixed), "--prompt", "class 1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [why]
    assert evaluate_cli.main(["--run", str(mixed), "--out", str(tmp_path / "ev")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [why]


@pytest.mark.parametrize(
    "stop, code, line",
    [
        (KeyboardInterrupt, 130, "interrupted while the evaluation was written: its files in {out} are partial"),
        (OSError(28, "No space left on device"), 1, "error: writing the evaluation into {out} failed: No space left"),
    ],
)
def test_a_stop_while_the_evaluation_is_written_says_what_is_partial(
    digits_run, tmp_path, monkeypatch, capsys, stop, code, line
):
    """It was a traceback (the writing was outside what the command caught), the files partial."""

    class Written:
        def write(self, out, tb_dir=None):
            (out / "table.md").write_text("half")
            raise stop

    monkeypatch.setattr(evaluate_cli, "sweep", lambda *a, **k: Written())
    out = tmp_path / "ev"
    assert evaluate_cli.main(["--run", str(digits_run), "--out", str(out)]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(line.format(out=out)), err
    assert not (out / ".lock").exists(), "released"


def test_an_evaluation_whose_out_dir_was_taken_over_writes_nothing_there(digits_run, tmp_path, monkeypatch, capsys):
    """Its lock taken over while it swept (the process stopped past the lease): it wrote its
    table, CSVs and plots over the other evaluation's."""
    from common import rundir

    out = tmp_path / "ev"
    other = {"host": "elsewhere", "pid": 4242, "started": "later"}

    class Written:
        def write(self, out, tb_dir=None):
            (out / "table.md").write_text("written over the other's")

    def swept(*args, **kwargs):
        (out / ".lock").write_text(json.dumps(other))
        time.sleep(0.3)
        return Written()

    monkeypatch.setattr(rundir, "LEASE_RENEW_S", 0.05)
    monkeypatch.setattr(evaluate_cli, "sweep", swept)
    assert evaluate_cli.main(["--run", str(digits_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: the evaluation dir {out} was taken over by pid 4242"), err
    assert not (out / "table.md").exists() and json.loads((out / ".lock").read_text()) == other


def test_generate_stopped_while_it_scores_says_the_image_is_kept(digits_run, tmp_path, monkeypatch, capsys):
    """It said 'nothing was written' beside the image it had written."""

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate_cli, "score", stopped)
    png = tmp_path / "s.png"
    assert generate_cli.main(["--run", str(digits_run), "--prompt", "7", "--score", "--out", str(png)]) == 130
    assert capsys.readouterr().err.strip() == f"interrupted: the image is in {png}, not scored"
    assert png.stat().st_size > 0
