"""bench/oracle_gap.py on a tiny toy budget: the oracle bounds every fixed method on every
context, the searched best is the best training mean, the figures are what they claim."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import load_config
from common.policy import SchedulePolicy, policy_kwargs
from tests.conftest import load_bench

REPO = Path(__file__).resolve().parents[2]
TINY_POLICY = {"widths": [8, 8, 16, 16], "groups": 4, "attn_heads": 2, "head_hidden": 16}


def _bench():
    return load_bench("oracle_gap.py")


def _fake_run(run_dir: Path):
    """A run directory as learner.main leaves it (config.yaml, policy/, global/policy/), without
    training: a conditional policy with a random head (so its schedules depend on the noise) and a
    global one."""
    cfg = load_config(["--config", str(REPO / "configs" / "toy.yaml")], policy={**TINY_POLICY, "init": "scratch"})
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    bench = _bench()
    sampler = bench.Backend.from_config(cfg).sampler
    L = cfg.rollout.steps
    kwargs = policy_kwargs(cfg.policy, sampler.spec(), L, sampler.default_tau(L))
    torch.manual_seed(0)
    SchedulePolicy(**kwargs).save_pretrained(run_dir / "policy")
    SchedulePolicy(**{**kwargs, "variant": "global"}).save_pretrained(run_dir / "global" / "policy")
    return bench.run_config(run_dir)


@pytest.fixture(scope="module")
def gap_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gap") / "run"
    return run_dir, _fake_run(run_dir)


@pytest.fixture(scope="module")
def gap(gap_run):
    bench = _bench()
    torch.set_num_threads(1)
    run_dir, cfg = gap_run
    backend = bench.Backend.from_config(cfg)
    return bench.oracle_gap(backend, run_dir, candidates=12, train_contexts=60, eval_seeds=4)


def test_held_out_noises_of_another_seed_change_the_held_out_contexts_only(gap, gap_run):
    """The shipped configs were picked on their runs' own held-out contexts: --held-out-seed scores
    every method on noises no setting was chosen on, after the same search on the same training
    contexts."""
    bench = _bench()
    run_dir, cfg = gap_run
    other = bench.oracle_gap(
        bench.Backend.from_config(cfg), run_dir, candidates=12, train_contexts=60, eval_seeds=4, held_out_seed=1
    )
    assert np.array_equal(other.train_scores, gap.train_scores) and other.prompts == gap.prompts
    assert not np.array_equal(other.eval_scores, gap.eval_scores)
    assert not np.array_equal(other.methods[bench.DEFAULT].reward, gap.methods[bench.DEFAULT].reward)


def test_candidates_are_the_exact_default_then_guarded_simplex_points():
    bench = _bench()
    default = np.array([0.0, 0.25, 0.25, 0.25, 0.25])
    c = bench.draw_candidates(default, 11, seed=3)
    assert c.shape == (11, 5)
    assert np.array_equal(c[0], default)  # exactly: the default row is read off the oracle's matrix
    np.testing.assert_allclose(c.sum(1), 1.0, atol=1e-12)
    assert (c[1:] >= 1e-6 * 0.999).all() and (c[1:] < 1).all()
    assert np.array_equal(c, bench.draw_candidates(default, 11, seed=3))  # seeded
    assert len({tuple(r) for r in c}) == 11


def test_best_by_group_takes_the_best_group_mean_and_pick_falls_back():
    bench = _bench()
    scores = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 3.0, 1.0, 1.0], [2.0, 2.0, 0.0, 2.0]])  # [candidates, contexts]
    # a tie goes to the lower index (candidate 0 is the default: a tie keeps it)
    assert bench.best_by_group(scores, ["a", "a", "b", "b"]) == {"a": 2, "b": 1}
    assert bench.best_by_group(scores, ["a", "b", "b", "c"]) == {"a": 2, "b": 1, "c": 2}
    idx, fell = bench.pick({"a": 2, "b": 1}, ["b", "z", "a"], np.array([0, 7, 0]))
    assert idx.tolist() == [1, 7, 2] and fell == 1


def test_within_prompt_share():
    bench = _bench()
    rng = np.random.default_rng(0)
    prompts = [p for p in "abcd" for _ in range(5)]
    by_prompt = {p: rng.dirichlet(np.ones(4)) for p in "abcd"}
    only_prompt = np.stack([by_prompt[p] for p in prompts])
    assert bench.within_prompt_share(only_prompt, prompts) == pytest.approx(0.0, abs=1e-12)
    noisy = rng.dirichlet(np.ones(4), size=20)
    share = bench.within_prompt_share(noisy, prompts)
    assert 0.0 < share < 1.0
    # the same noise around every prompt's mean: no between-prompt variance at all
    centred = np.tile(noisy[:5], (4, 1))
    assert bench.within_prompt_share(centred, prompts) == pytest.approx(1.0)
    assert np.isnan(bench.within_prompt_share(np.tile(by_prompt["a"], (20, 1)), prompts))


def test_oracle_bounds_every_fixed_method_on_every_context(gap):
    bench = _bench()
    m = gap.methods
    assert set(m) == {
        bench.DEFAULT,
        bench.FIXED,
        bench.PER_PROMPT,
        bench.PER_MODE,
        bench.ORACLE,
        bench.GLOBAL,
        bench.INSTANCE,
    }
    n = len(gap.prompts)
    assert n == 10 * 4 and all(len(x.reward) == n for x in m.values())
    for name in (bench.DEFAULT, bench.FIXED, bench.PER_PROMPT, bench.PER_MODE):
        assert (m[bench.ORACLE].reward >= m[name].reward).all(), name
        # every fixed method executes candidates, so the oracle could have picked it
        assert all((gap.candidates == t).all(1).any() for t in m[name].tau), name
    np.testing.assert_array_equal(m[bench.ORACLE].reward, gap.eval_scores.max(0))
    np.testing.assert_array_equal(m[bench.DEFAULT].tau, np.tile(gap.candidates[0], (n, 1)))


def test_best_fixed_is_the_best_training_mean(gap):
    bench = _bench()
    train_means = gap.train_scores.mean(1)
    best = gap.notes["search"]["best"]
    assert gap.train_scores.shape == (12, 60)
    assert train_means[best] == train_means.max()
    assert gap.notes["search"]["best_train_mean"] == pytest.approx(train_means.max())
    np.testing.assert_array_equal(gap.methods[bench.FIXED].tau[0], gap.candidates[best])
    np.testing.assert_array_equal(gap.methods[bench.FIXED].reward, gap.eval_scores[best])


def test_rows_are_paired_gains_and_shares_of_the_oracle_gain(gap):
    bench = _bench()
    rows = gap.rows()
    base = gap.methods[bench.DEFAULT].reward
    oracle_gain = float((gap.methods[bench.ORACLE].reward - base).mean())
    assert oracle_gain > 0
    assert rows[bench.ORACLE]["oracle_share"] == pytest.approx(1.0)
    assert rows[bench.DEFAULT]["gain"] == 0.0 and rows[bench.DEFAULT]["oracle_share"] == 0.0
    for name, r in rows.items():
        gain = float((gap.methods[name].reward - base).mean())
        assert r["gain"] == pytest.approx(gain)
        assert r["oracle_share"] == pytest.approx(gain / oracle_gain)
        assert r["mean"] == pytest.approx(gap.methods[name].reward.mean())
        assert r["n"] == len(base) and r["se"] > 0
    d = gap.learned_vs_fixed()
    diff = gap.methods[bench.INSTANCE].reward - gap.methods[bench.FIXED].reward
    assert d["mean"] == pytest.approx(diff.mean()) and d["z"] == pytest.approx(d["mean"] / d["se"])


def test_learned_schedules_and_noise_dependence(gap):
    bench = _bench()
    inst, glob = gap.methods[bench.INSTANCE].tau, gap.methods[bench.GLOBAL].tau
    np.testing.assert_allclose(inst.sum(1), 1.0, atol=1e-12)
    assert (inst > 0).all()
    assert np.allclose(glob, glob[0])  # one schedule for every context
    shares = gap.within_prompt()
    assert set(shares) == {bench.INSTANCE, bench.ORACLE}
    assert all(0.0 <= v <= 1.0 for v in shares.values()), shares
    assert shares[bench.INSTANCE] > 0  # the policy reads the noise


def test_toy_mode_is_the_class_mode_a_many_step_flow_reaches():
    bench = _bench()
    from learner.contexts import eval_contexts

    cfg = load_config(["--config", str(REPO / "configs" / "toy.yaml")])
    backend = bench.Backend.from_config(cfg)
    ctxs = bench.make_contexts(backend, eval_contexts(["class 0", "class 1", "class 2"], 20, 0))
    means = backend.sampler.mixture.means  # [classes, modes, D]
    assert ctxs.modes.shape == (60,) and set(ctxs.modes) <= set(range(means.shape[1]))
    assert len(set(ctxs.modes[ctxs.labels == 0])) > 1  # noises of one prompt reach different modes
    # a 256-step sample lies on its mode: within a few spreads of the centre
    x = bench.sample(backend, ctxs.prompts, ctxs.noise, np.tile(backend.sampler.default_tau(256), (60, 1)))
    dist = np.linalg.norm(x - means[ctxs.labels, ctxs.modes], axis=1)
    assert (dist < 5 * cfg.sampler.toy.spread * np.sqrt(cfg.sampler.toy.dim)).all()


def test_summary_is_json_and_the_table_has_every_row(gap):
    bench = _bench()
    text = gap.format()
    for name in gap.methods:
        assert f"| {name} |" in text
    assert "search budget: 12 candidates x 60 training contexts" in text
    summary = json.loads(json.dumps(gap.summary(), default=bench._json_default))
    assert summary["rows"][bench.ORACLE]["oracle_share"] == pytest.approx(1.0)
    assert summary["held_out"] == {"contexts": 40, "prompts": 10}


@pytest.mark.ray
def test_main_trains_with_the_real_entry_point_and_reads_its_policies(tmp_path):
    """No --run-toy: the bench trains the global and the conditional policy with learner.main.run,
    then evaluates them on the same held-out contexts as the run's own final evaluation."""
    bench = _bench()
    out = tmp_path / "gap.json"
    flags = [
        "--experiment.name=t",
        "--learner.iterations=2",
        "--learner.eval_seeds=2",
        "--learner.checkpoint_every=2",
        "--rollout.contexts_per_iter=4",
        "--rollout.steps=3",
        "--learner.rollout_log=false",
        *(f"--policy.{k}={json.dumps(v, separators=(',', ':'))}" for k, v in TINY_POLICY.items()),
    ]
    args = ["--backend", "toy", "--train-dir", str(tmp_path), "--candidates", "4", "--train-contexts", "20"]
    results = bench.main([*args, "--eval-seeds", "2", "--out", str(out), "--", *flags])
    gap = results["toy"]
    assert gap.steps == 3 and {bench.GLOBAL, bench.INSTANCE} <= set(gap.methods)
    # the bench's in-process rewards of the learned schedules are the run's own held-out evaluation
    run_eval = json.loads((tmp_path / "t" / "eval.json").read_text())
    for name in (bench.DEFAULT, bench.GLOBAL, bench.INSTANCE):
        assert gap.rows()[name]["mean"] == pytest.approx(run_eval[name]["mean"], rel=1e-5, abs=1e-6), name
    saved = json.loads(out.read_text())
    assert set(saved["toy"]["rows"]) == set(gap.methods)
