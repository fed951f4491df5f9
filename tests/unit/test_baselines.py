"""Reward baselines (learner/baselines.py) against docs/method.md.

Expected values come from two places that do not share code with the implementation:
hand-worked numbers for a small matrix (the working is in the comments), and a slow reference
written as explicit Python loops straight from the formulas in docs/method.md.
"""

from __future__ import annotations

from fractions import Fraction as F

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from learner.baselines import compute

NAMES = ("none", "mean", "rloo", "xctx", "js", "js_loco")
MIN_C = {"none": 1, "mean": 1, "rloo": 1, "xctx": 2, "js": 2, "js_loco": 3}
# Baselines where b_ci must not depend on r_ci (docs/method.md: rloo and xctx leave r_ci out by
# definition; js_loco is "strictly unbiased, b_ci never depends on r_ci").
LEAVE_ONE_OUT = ("rloo", "xctx", "js_loco")

FAST = settings(max_examples=100, deadline=None)


# --- slow reference: explicit loops, one line per formula of docs/method.md ------------------


def ref_none(r):
    return [[0.0 for _ in row] for row in r]


def ref_mean(r):
    total = sum(x for row in r for x in row)
    n = sum(len(row) for row in r)
    return [[total / n for _ in row] for row in r]


def ref_rloo(r):
    # b_ci = (sum_{j != i} r_cj) / (K - 1)
    out = []
    for row in r:
        k = len(row)
        out.append([sum(row[j] for j in range(k) if j != i) / (k - 1) for i in range(k)])
    return out


def ref_xctx(r):
    # b_ci = (sum of all r - r_ci) / (C*K - 1), written literally as the sum over every other entry
    c, k = len(r), len(r[0])
    out = []
    for cc in range(c):
        row = []
        for i in range(k):
            s = sum(r[d][j] for d in range(c) for j in range(k) if (d, j) != (cc, i))
            row.append(s / (c * k - 1))
        out.append(row)
    return out


def ref_js_weight(r):
    """(s2, d2, alpha) of docs/method.md for a list of rows (C >= 2 contexts, K >= 2 each)."""
    c, k = len(r), len(r[0])
    means = [sum(row) / k for row in r]
    grand = sum(means) / c
    s2 = sum((r[cc][i] - means[cc]) ** 2 for cc in range(c) for i in range(k)) / (c * (k - 1))
    d2 = max(0.0, sum((means[cc] - grand) ** 2 for cc in range(c)) / (c - 1) - s2 / k)
    if s2 == 0 and d2 == 0:
        alpha = 0.0
    else:
        alpha = (s2 / (k - 1)) / (s2 / (k - 1) + d2)
    return s2, d2, alpha


def ref_js(r):
    s2, d2, alpha = ref_js_weight(r)
    rl, xc = ref_rloo(r), ref_xctx(r)
    b = [[(1 - alpha) * rl[cc][i] + alpha * xc[cc][i] for i in range(len(r[0]))] for cc in range(len(r))]
    return b, {"alpha": alpha, "s2": s2, "d2": d2}


def ref_js_loco(r):
    c, k = len(r), len(r[0])
    rl = ref_rloo(r)
    b, alphas, s2s, d2s = [], [], [], []
    for cc in range(c):
        others = [r[d] for d in range(c) if d != cc]
        s2, d2, alpha = ref_js_weight(others)
        target = sum(x for row in others for x in row) / ((c - 1) * k)  # mean of all other rewards
        b.append([(1 - alpha) * rl[cc][i] + alpha * target for i in range(k)])
        alphas.append(alpha)
        s2s.append(s2)
        d2s.append(d2)
    return b, {"alpha": alphas, "s2": s2s, "d2": d2s}


def reference(name, r):
    rows = [[float(x) for x in row] for row in np.asarray(r, dtype=np.float64)]
    if name == "js":
        return ref_js(rows)
    if name == "js_loco":
        return ref_js_loco(rows)
    return {"none": ref_none, "mean": ref_mean, "rloo": ref_rloo, "xctx": ref_xctx}[name](rows), {}


# --- strategies ------------------------------------------------------------------------------------

BOUND = 1e3
finite = st.floats(-BOUND, BOUND, allow_nan=False, allow_infinity=False)


def reward_matrices(min_c=2, max_c=6, min_k=2, max_k=5, dtype=np.float64):
    shapes = st.tuples(st.integers(min_c, max_c), st.integers(min_k, max_k))
    return hnp.arrays(dtype, shapes, elements=finite)


def tol(r, *extra):
    """Absolute tolerance scaled to the magnitude of the rewards (float64 rounding)."""
    scale = max([1.0, float(np.max(np.abs(r)))] + [abs(float(x)) for x in extra])
    return 1e-9 * scale


# --- hand-worked cases ---------------------------------------------------------------------------

# C = 3 contexts, K = 2 rollouts.
R = [[1, 3], [2, 6], [5, 7]]
# sum = 24, C*K = 6, mean 4.
# rloo (K=2): the other entry of the row.
# xctx: (24 - r_ci) / 5.
# js: context means 2, 4, 6; grand mean 4.
#   within: (1-2)^2+(3-2)^2 = 2, (2-4)^2+(6-4)^2 = 8, (5-6)^2+(7-6)^2 = 2 -> 12; s2 = 12 / (3*1) = 4
#   between: ((2-4)^2 + 0 + (6-4)^2) / (3-1) = 4;  d2 = max(0, 4 - 4/2) = 2
#   alpha = (4/1) / (4/1 + 2) = 2/3;  b = 1/3 rloo + 2/3 xctx
# js_loco:
#   c=0, others [[2,6],[5,7]]: means 4, 6; s2 = (8+2)/(2*1) = 5; spread = (1+1)/1 = 2;
#        d2 = max(0, 2 - 5/2) = 0; alpha = 1; target = 20/4 = 5  -> b_0 = (5, 5)
#   c=1, others [[1,3],[5,7]]: means 2, 6; s2 = (2+2)/2 = 2; spread = (4+4)/1 = 8;
#        d2 = 8 - 2/2 = 7; alpha = 2/(2+7) = 2/9; target = 16/4 = 4
#        b_10 = 7/9*6 + 2/9*4 = 50/9,  b_11 = 7/9*2 + 2/9*4 = 22/9
#   c=2, others [[1,3],[2,6]]: means 2, 4; s2 = (2+8)/2 = 5; spread = (1+1)/1 = 2;
#        d2 = max(0, 2 - 5/2) = 0; alpha = 1; target = 12/4 = 3  -> b_2 = (3, 3)
_XC = [[F(23, 5), F(21, 5)], [F(22, 5), F(18, 5)], [F(19, 5), F(17, 5)]]
_RL = [[3, 1], [6, 2], [7, 5]]
HAND = {
    "none": [[0, 0], [0, 0], [0, 0]],
    "mean": [[4, 4], [4, 4], [4, 4]],
    "rloo": _RL,
    "xctx": _XC,
    "js": [[F(1, 3) * _RL[c][i] + F(2, 3) * _XC[c][i] for i in range(2)] for c in range(3)],
    "js_loco": [[5, 5], [F(50, 9), F(22, 9)], [3, 3]],
}
HAND_DIAG = {
    "js": {"alpha": F(2, 3), "s2": 4, "d2": 2},
    "js_loco": {"alpha": [1, F(2, 9), 1], "s2": [5, 2, 5], "d2": [0, 7, 0]},
}

# C = 2, K = 3: rloo and xctx with denominators other than 1.
R2 = [[1, 2, 6], [0, 3, 3]]
# rloo: row sums 9 and 6 -> (8/2, 7/2, 3/2), (6/2, 3/2, 3/2)
# xctx: total 15 -> (15 - r) / 5
# js: means 3, 2; within 4+1+9 + 4+1+1 = 20; s2 = 20/(2*2) = 5; between ((.5)^2+(.5)^2)/1 = 0.5;
#     d2 = max(0, 0.5 - 5/3) = 0 -> alpha = 1 -> js = xctx
HAND2 = {
    "rloo": [[4, F(7, 2), F(3, 2)], [3, F(3, 2), F(3, 2)]],
    "xctx": [[F(14, 5), F(13, 5), F(9, 5)], [3, F(12, 5), F(12, 5)]],
    "js": [[F(14, 5), F(13, 5), F(9, 5)], [3, F(12, 5), F(12, 5)]],
}


def _as_float(m):
    return np.array([[float(x) for x in row] for row in m], dtype=np.float64)


@pytest.mark.parametrize("name", NAMES)
def test_hand_computed_3x2(name):
    b, diag = compute(name, np.array(R, dtype=np.float64))
    np.testing.assert_allclose(b, _as_float(HAND[name]), rtol=0, atol=1e-12)
    for key, want in HAND_DIAG.get(name, {}).items():
        np.testing.assert_allclose(
            np.asarray(diag[key], dtype=np.float64),
            np.asarray(want, dtype=np.float64),
            rtol=0,
            atol=1e-12,
            err_msg=f"{name} diagnostic {key}",
        )


@pytest.mark.parametrize("name", sorted(HAND2))
def test_hand_computed_2x3(name):
    b, diag = compute(name, np.array(R2, dtype=np.float64))
    np.testing.assert_allclose(b, _as_float(HAND2[name]), rtol=0, atol=1e-12)
    if name == "js":
        assert diag["alpha"] == pytest.approx(1.0)
        assert diag["s2"] == pytest.approx(5.0)
        assert diag["d2"] == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_hand_cases_match_the_reference(name):
    """The loop reference reproduces the hand-worked numbers (so it is a fair judge below)."""
    b, diag = reference(name, np.array(R, dtype=np.float64))
    np.testing.assert_allclose(np.array(b), _as_float(HAND[name]), rtol=0, atol=1e-12)
    for key, want in HAND_DIAG.get(name, {}).items():
        np.testing.assert_allclose(
            np.asarray(diag[key], dtype=np.float64), np.asarray(want, dtype=np.float64), atol=1e-12
        )


def test_js_alpha_zero_when_both_variances_zero():
    r = np.full((3, 4), 2.5)
    b, diag = compute("js", r)
    assert diag["alpha"] == 0.0 and diag["s2"] == 0.0 and diag["d2"] == 0.0
    np.testing.assert_array_equal(b, r)
    b, diag = compute("js_loco", r)
    np.testing.assert_array_equal(diag["alpha"], np.zeros(3))
    np.testing.assert_array_equal(b, r)


def test_js_is_not_leave_one_out():
    """Sanity check of the perturbation test below: plain js does depend on r_ci (through alpha)."""
    r = np.array(R, dtype=np.float64)
    b0, _ = compute("js", r)
    r2 = r.copy()
    r2[0, 0] = 40.0
    b1, _ = compute("js", r2)
    assert abs(b1[0, 0] - b0[0, 0]) > 1e-3


# --- agreement with the reference on random inputs -------------------------------------------------


@FAST
@given(name=st.sampled_from(NAMES), r=reward_matrices(min_c=3))
def test_matches_reference(name, r):
    b, diag = compute(name, r)
    want, want_diag = reference(name, r)
    np.testing.assert_allclose(b, np.array(want), rtol=1e-9, atol=tol(r))
    for key in want_diag:
        got = np.asarray(diag[key], dtype=np.float64)
        exp = np.asarray(want_diag[key], dtype=np.float64)
        if key == "alpha":
            # alpha is a ratio of variances: compare it where the within-context variance is not
            # at the level of rounding noise (where it is, b barely depends on alpha; checked above)
            mask = np.atleast_1d(np.asarray(want_diag["s2"])) > 1e-9
            np.testing.assert_allclose(np.atleast_1d(got)[mask], np.atleast_1d(exp)[mask], rtol=1e-7, atol=1e-9)
        else:
            np.testing.assert_allclose(got, exp, rtol=1e-7, atol=1e-9 * max(1.0, float(np.max(r**2))))


@FAST
@given(r=reward_matrices(min_c=2))
def test_js_equals_reference_formula(r):
    """js with C = 2 too (js_loco needs 3): b = (1 - alpha) rloo + alpha xctx with DESIGN's alpha."""
    b, diag = compute("js", r)
    want, want_diag = ref_js([list(map(float, row)) for row in r])
    np.testing.assert_allclose(b, np.array(want), rtol=1e-9, atol=tol(r))
    assert isinstance(diag["alpha"], float)
    assert diag["s2"] == pytest.approx(want_diag["s2"], rel=1e-7, abs=1e-9)
    assert diag["d2"] == pytest.approx(want_diag["d2"], rel=1e-7, abs=1e-9 * max(1.0, float(np.max(r**2))))
    # b is the stated convex combination of the diagnostics' alpha
    a = diag["alpha"]
    rl, xc = np.array(ref_rloo(r.tolist())), np.array(ref_xctx(r.tolist()))
    np.testing.assert_allclose(b, (1 - a) * rl + a * xc, rtol=1e-9, atol=tol(r))


@FAST
@given(name=st.sampled_from(("js", "js_loco")), r=reward_matrices(min_c=3))
def test_js_alpha_in_unit_interval(name, r):
    _, diag = compute(name, r)
    alpha = np.asarray(diag["alpha"], dtype=np.float64)
    assert np.all(np.isfinite(alpha))
    assert np.all((alpha >= 0.0) & (alpha <= 1.0)), alpha
    assert np.all(np.asarray(diag["s2"]) >= 0) and np.all(np.asarray(diag["d2"]) >= 0)
    if name == "js_loco":
        for key in ("alpha", "s2", "d2"):
            assert isinstance(diag[key], np.ndarray) and diag[key].shape == (r.shape[0],)


# --- the leave-one-out property --------------------------------------------------------------------


@FAST
@given(
    name=st.sampled_from(LEAVE_ONE_OUT),
    r=reward_matrices(min_c=3),
    where=st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)),
    new=finite,
)
def test_leave_one_out(name, r, where, new):
    """Changing r_ci never changes b_ci (it may change the rest of the matrix)."""
    c, i = where[0] % r.shape[0], where[1] % r.shape[1]
    b, _ = compute(name, r)
    r2 = r.copy()
    r2[c, i] = new
    b2, _ = compute(name, r2)
    assert b2[c, i] == pytest.approx(b[c, i], rel=0, abs=tol(r, new)), (name, c, i)


@FAST
@given(r=reward_matrices(min_c=3), where=st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)), new=finite)
def test_js_loco_context_weight_ignores_its_own_context(r, where, new):
    """alpha_c, s2_c, d2_c come from the other contexts only: changing row c leaves them alone."""
    c, i = where[0] % r.shape[0], where[1] % r.shape[1]
    _, d = compute("js_loco", r)
    r2 = r.copy()
    r2[c, i] = new
    _, d2 = compute("js_loco", r2)
    for key in ("alpha", "s2", "d2"):
        assert d2[key][c] == pytest.approx(d[key][c], rel=1e-9, abs=1e-12), key


# --- the two limits of the shrinkage ---------------------------------------------------------------


@FAST
@given(
    c=st.integers(2, 6),
    k=st.integers(2, 5),
    seed=st.integers(0, 2**32 - 1),
    spacing=st.floats(1e4, 1e6),
    noise_scale=st.floats(0.0, 1.0),
)
def test_js_tends_to_rloo_when_contexts_differ_widely(c, k, seed, spacing, noise_scale):
    rng = np.random.default_rng(seed)
    offsets = spacing * rng.permutation(c).astype(np.float64)  # contexts far apart
    r = offsets[:, None] + noise_scale * rng.uniform(-1, 1, size=(c, k))  # little noise within
    b, diag = compute("js", r)
    assert diag["alpha"] < 1e-6
    rl = np.array(ref_rloo(r.tolist()))
    np.testing.assert_allclose(b, rl, rtol=0, atol=1e-6 * spacing * c)
    # and it is far from the cross-context baseline, which mixes contexts
    assert np.max(np.abs(b - np.array(ref_xctx(r.tolist())))) > 0.1 * spacing


@FAST
@given(
    c=st.integers(2, 6),
    base=hnp.arrays(np.float64, st.integers(2, 5), elements=st.floats(-1, 1)),
    seed=st.integers(0, 2**32 - 1),
    scale=st.floats(1e3, 1e5),
)
def test_js_tends_to_xctx_when_within_noise_dominates(c, base, seed, scale):
    assume(np.ptp(base) > 0.1)
    rng = np.random.default_rng(seed)
    offsets = rng.uniform(-1, 1, size=c)  # contexts nearly alike ...
    r = offsets[:, None] + scale * np.stack([rng.permutation(base) for _ in range(c)])  # ... loud within
    b, diag = compute("js", r)
    assert diag["alpha"] > 1 - 1e-9
    np.testing.assert_allclose(b, np.array(ref_xctx(r.tolist())), rtol=1e-9, atol=tol(r))
    if c >= 3:
        _, dl = compute("js_loco", r)
        assert np.all(dl["alpha"] > 1 - 1e-9)


# --- types, dtypes, shapes -------------------------------------------------------------------------


@FAST
@given(
    name=st.sampled_from(NAMES),
    r=reward_matrices(min_c=3, dtype=np.float64),
    kind=st.sampled_from(["np32", "np64", "torch32", "torch64"]),
)
def test_type_dtype_shape_preserved(name, r, kind):
    if kind == "np32":
        x = r.astype(np.float32)
    elif kind == "np64":
        x = r
    elif kind == "torch32":
        x = torch.tensor(r, dtype=torch.float32)
    else:
        x = torch.tensor(r, dtype=torch.float64)
    before = x.clone() if isinstance(x, torch.Tensor) else x.copy()
    b, _ = compute(name, x)
    assert type(b) is type(x)
    assert b.dtype == x.dtype and tuple(b.shape) == tuple(x.shape)
    if isinstance(x, torch.Tensor):
        assert b.device == x.device
        assert torch.equal(x, before)
    else:
        np.testing.assert_array_equal(x, before)
    # numpy and torch agree, value for value, at the input's precision
    ref, _ = compute(name, np.asarray(before.numpy() if isinstance(before, torch.Tensor) else before, dtype=np.float64))
    got = b.numpy() if isinstance(b, torch.Tensor) else b
    single = kind.endswith("32")
    np.testing.assert_allclose(
        got.astype(np.float64),
        ref,
        rtol=1e-5 if single else 1e-12,
        atol=(1e-4 if single else 1e-12) * max(1.0, float(np.max(np.abs(r)))),
    )


@pytest.mark.parametrize("name", NAMES)
def test_torch_baseline_is_detached(name):
    r = torch.tensor(R, dtype=torch.float32, requires_grad=True)
    b, _ = compute(name, r)
    assert not b.requires_grad
    assert b.dtype == torch.float32


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("to_torch", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_error_k_below_two(name, to_torch):
    r = np.ones((4, 1))
    with pytest.raises(ValueError, match=r"K"):
        compute(name, torch.tensor(r) if to_torch else r)


@pytest.mark.parametrize("to_torch", [False, True])
@pytest.mark.parametrize("name", [n for n in NAMES if MIN_C[n] > 1])
def test_error_too_few_contexts(name, to_torch):
    r = np.arange(2.0 * (MIN_C[name] - 1)).reshape(MIN_C[name] - 1, 2)
    with pytest.raises(ValueError, match=r"context") as err:
        compute(name, torch.tensor(r) if to_torch else r)
    assert str(MIN_C[name]) in str(err.value)
    # and one more context is enough
    compute(name, np.arange(2.0 * MIN_C[name]).reshape(MIN_C[name], 2))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("to_torch", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_error_non_finite(name, to_torch, bad):
    r = np.arange(8.0).reshape(4, 2)
    r[2, 1] = bad
    with pytest.raises(ValueError, match=r"non-finite"):
        compute(name, torch.tensor(r) if to_torch else r)


@pytest.mark.parametrize("shape", [(6,), (2, 3, 2), ()])
@pytest.mark.parametrize("to_torch", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_error_not_two_dimensional(name, to_torch, shape):
    r = np.ones(shape)
    with pytest.raises(ValueError, match=r"\[C, K\]|shape"):
        compute(name, torch.tensor(r) if to_torch else r)


@pytest.mark.parametrize("name", ["JS", "loo", "", "james_stein"])
def test_error_unknown_name(name):
    with pytest.raises(ValueError, match=r"unknown baseline") as err:
        compute(name, np.ones((4, 2)))
    assert repr(name) in str(err.value)
    assert "js_loco" in str(err.value)  # lists the valid names
