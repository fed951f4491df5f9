"""Standard errors clustered by prompt (learner/stats.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.stats import mean_se

finite = st.floats(-1e3, 1e3, allow_nan=False)


@given(st.lists(finite, min_size=2, max_size=40))
def test_singleton_clusters_give_the_plain_standard_error(xs):
    x = np.array(xs)
    plain = mean_se(x)
    clustered = mean_se(x, clusters=range(len(x)))
    assert math.isclose(plain["mean"], clustered["mean"], rel_tol=1e-12, abs_tol=1e-12)
    assert math.isclose(plain["se"], clustered["se"], rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(plain["se"], x.std(ddof=1) / math.sqrt(len(x)), rel_tol=1e-9, abs_tol=1e-9)


@settings(max_examples=50)
@given(st.lists(finite, min_size=2, max_size=12), st.integers(1, 8))
def test_values_equal_within_a_cluster_count_once_per_cluster(means, size):
    """m copies of each cluster's value: the s.e. of the mean of the G cluster means, not of G*m values."""
    x = np.repeat(means, size)
    labels = np.repeat(np.arange(len(means)), size)
    got = mean_se(x, clusters=labels)
    assert math.isclose(got["se"], np.std(means, ddof=1) / math.sqrt(len(means)), rel_tol=1e-9, abs_tol=1e-9)
    assert got["n"] == len(x)


def test_correlated_noises_widen_the_error_bar():
    rng = np.random.default_rng(0)
    prompt_effect = np.repeat(rng.normal(size=10), 100)  # 10 prompts x 100 noises
    x = prompt_effect + 0.1 * rng.normal(size=1000)
    labels = np.repeat(np.arange(10), 100)
    assert mean_se(x, labels)["se"] > 5 * mean_se(x)["se"]


def test_one_cluster_has_no_standard_error():
    assert math.isnan(mean_se(np.arange(5.0), clusters=["a"] * 5)["se"])


def test_the_table_says_why_one_held_out_prompt_has_no_standard_error():
    from learner.evaluate import DEFAULT, EvalResult

    one = EvalResult({DEFAULT: np.arange(4.0), "x": np.arange(4.0) + 1}, prompts=["a cat"] * 4)
    table = one.table("held out")
    assert "+- nan" in table and table.endswith("needs two held-out prompts or more)")
    two = EvalResult({DEFAULT: np.arange(4.0), "x": np.arange(4.0) + 1}, prompts=["a cat", "a dog"] * 2)
    assert "nan" not in two.table("held out") and "needs two" not in two.table("held out")


def test_each_set_metric_is_labelled_with_the_way_its_class_says_is_better(tmp_path):
    from learner.evaluate import DEFAULT, EvalResult, Sweep

    rewards = {DEFAULT: np.arange(4.0), "x": np.arange(4.0) + 1}
    metrics = {DEFAULT: {"fd": 3.0, "agreement": 0.5}, "x": {"fd": 2.0, "agreement": 0.75}}
    res = EvalResult(rewards, metrics, prompts=["a", "b"] * 2, lower_is_better={"fd": True, "agreement": False})
    head = res.table("held out").splitlines()[1]
    assert "agreement (higher better)" in head and "fd (lower better)" in head
    sweep = Sweep({2: res}, [])
    assert [sweep.label(m) for m in sweep.measures()] == [
        "reward (higher better)",
        "fd (lower better)",
        "agreement (higher better)",
    ]
    assert "**agreement (higher better)**" in sweep.markdown()


def test_the_instance_level_policy_is_compared_paired_with_the_best_fixed_schedule_learned():
    """Besides each schedule against the default, the table's rows and the sweep's show the
    instance-level policy minus the learned global schedule, paired (same prompts and noises): the
    gain a fixed schedule does not also get. Its s.e. is the clustered s.e. of the per-context
    differences, far below either schedule's own where the prompts' effect is shared."""
    from learner.evaluate import DEFAULT, GLOBAL, INSTANCE, EvalResult, Sweep

    rng = np.random.default_rng(0)
    prompts = [f"p{i}" for i in range(8) for _ in range(25)]
    effect = np.repeat(rng.normal(size=8), 25)
    glob = effect + 1.0 + 0.1 * rng.normal(size=200)
    inst = glob + 0.05 + 0.02 * rng.normal(size=200)
    rewards = {DEFAULT: effect + 0.1 * rng.normal(size=200), GLOBAL: glob, INSTANCE: inst}
    metrics = {INSTANCE: {"fd": 2.0}, GLOBAL: {"fd": 3.0}, f"{INSTANCE} - {GLOBAL}": {"fd": -1.0, "fd_se": 0.1}}
    res = EvalResult(rewards, metrics, prompts=prompts, lower_is_better={"fd": True})
    assert res.pairs() == [(GLOBAL, DEFAULT), (INSTANCE, DEFAULT), (INSTANCE, GLOBAL)]
    row = res.summary()[f"{INSTANCE} - {GLOBAL}"]
    assert row["mean"] == pytest.approx(float((inst - glob).mean()))
    assert (
        row["se"] == pytest.approx(mean_se(inst - glob, prompts)["se"])
        and row["se"] < mean_se(inst, prompts)["se"] / 10
    )
    assert (row["fd"], row["fd_se"]) == (-1.0, 0.1)
    assert f"\n{INSTANCE} - {GLOBAL} " in res.table("held out")
    sweep = Sweep({3: res}, [])
    by_row = sweep.table("reward", differences=True)
    assert by_row[f"{INSTANCE} - {GLOBAL}"][3] == pytest.approx((row["mean"], row["se"]))
    assert f"{INSTANCE} - {GLOBAL}" not in sweep.table("reward")  # the plots: the schedules only
    assert sweep.table("fd", differences=True)[f"{INSTANCE} - {GLOBAL}"][3] == (-1.0, 0.1)
    assert f"| {INSTANCE} - {GLOBAL} | -1 +- 0.1 |" in sweep.markdown()
