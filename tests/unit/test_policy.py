"""The Dirichlet schedule policy: shapes, variants, init, masking, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from common.devices import resolve_device
from common.policy import (
    ALPHA_MIN,
    FlatState,
    PolicyInputs,
    SchedulePolicy,
    Weights,
    collate,
    describe,
    load_numpy_state,
    log_dirichlet,
    log_prob,
    sample_log_tau,
    sample_log_taus,
    state_to_numpy,
)
from common.schedule import uniform_flow_tau

TINY = {"widths": [8, 8, 16, 16], "groups": 4, "attn_heads": 2, "head_hidden": 16, "input_kind": "vector"}


def _inputs(b=3, x_shape=(4,), t=5, e=6, p=6, seed=0) -> PolicyInputs:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 3:] = False
    return PolicyInputs(
        x=torch.randn(b, *x_shape, generator=g),
        tokens=torch.randn(b, t, e, generator=g),
        mask=mask,
        pooled=torch.randn(b, p, generator=g),
    )


@pytest.mark.parametrize("x_shape", [(4,), (4, 16, 16), (3, 8, 8)])
def test_conditional_shapes_vector_and_image(x_shape):
    torch.manual_seed(0)
    kind = "vector" if len(x_shape) == 1 else "image"
    pol = SchedulePolicy(
        steps=5, in_channels=x_shape[0], token_dim=6, pooled_dim=6, **{**TINY, "input_kind": kind}
    ).eval()
    alpha = pol(_inputs(x_shape=x_shape))
    assert alpha.shape == (3, 6) and alpha.dtype == torch.float32
    assert bool((alpha > ALPHA_MIN).all())
    with pytest.raises(ValueError, match=f"reads {kind} noise"):
        pol(_inputs(x_shape=(4, 8, 8) if kind == "vector" else (4,)))


def test_vector_policy_sees_the_noise_scale():
    """A vector x_T reaches the head through MLP blocks: scaling the noise changes alpha (a conv on
    a 1x1 image followed by GroupNorm over groups of one pixel would normalise the scale away)."""
    torch.manual_seed(0)
    pol = SchedulePolicy(steps=3, in_channels=4, token_dim=6, pooled_dim=6, **TINY).eval()
    inp = _inputs()
    scaled = PolicyInputs(x=3 * inp.x, tokens=inp.tokens, mask=inp.mask, pooled=inp.pooled)
    assert not torch.allclose(pol(inp), pol(scaled), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("concentration", [50.0, 1e6])  # 1e6: the config's largest (exp overflowed past ~710)
def test_default_init_mean_is_the_default_schedule(concentration):
    tau0 = uniform_flow_tau(4)
    for variant in ("conditional", "global"):
        pol = SchedulePolicy(
            steps=4,
            in_channels=4,
            token_dim=6,
            pooled_dim=6,
            variant=variant,
            init="default",
            default_tau=tau0.tolist(),
            concentration=concentration,
            **TINY,
        ).eval()
        alpha = pol(_inputs()).detach().double()
        mean = (alpha / alpha.sum(-1, keepdim=True)).numpy()
        assert np.allclose(alpha.sum(-1).numpy(), concentration, rtol=1e-4)
        # tau_1 = 0 is floored at 1e-3 so the mean lies inside the simplex
        expected = np.maximum(tau0, 1e-3) / np.maximum(tau0, 1e-3).sum()
        np.testing.assert_allclose(mean, np.broadcast_to(expected, mean.shape), atol=1e-5)


def test_padding_tokens_are_ignored():
    torch.manual_seed(0)
    pol = SchedulePolicy(steps=3, in_channels=4, token_dim=6, pooled_dim=0, **TINY).eval()
    inp = _inputs(b=1)
    inp.mask[0, 3:] = False
    garbage = inp.tokens.clone()
    garbage[0, 3:] = 1e3
    a1 = pol(inp)
    a2 = pol(PolicyInputs(inp.x, garbage, inp.mask, None))
    a3 = pol(PolicyInputs(inp.x, inp.tokens[:, :3], inp.mask[:, :3], None))
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(a1, a3, atol=1e-6, rtol=1e-5)


def test_all_masked_context_is_an_error():
    pol = SchedulePolicy(steps=3, in_channels=4, token_dim=6, **TINY).eval()
    inp = _inputs(b=2)
    inp.mask[1] = False
    with pytest.raises(ValueError, match="at least one real text token"):
        pol(inp)


def test_conditional_output_depends_on_inputs_global_does_not():
    torch.manual_seed(1)
    cond = SchedulePolicy(steps=3, in_channels=4, token_dim=6, pooled_dim=6, **TINY).eval()
    glob = SchedulePolicy(steps=3, in_channels=4, token_dim=6, variant="global").eval()
    a = cond(_inputs(seed=0))
    b = cond(_inputs(seed=1))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(glob(_inputs(seed=0)), glob(_inputs(seed=1)))
    assert glob.num_parameters() == 4


def test_save_and_load_restore_an_identical_policy(tmp_path, capsys):
    torch.manual_seed(0)
    pol = SchedulePolicy(steps=4, in_channels=4, token_dim=6, pooled_dim=6, **TINY).eval()
    pol.save_pretrained(tmp_path / "p")
    assert (tmp_path / "p" / "model.safetensors").is_file()
    again = SchedulePolicy.from_pretrained(tmp_path / "p").eval()
    assert capsys.readouterr().out == "", "nothing on the output of the commands that load one"
    assert again.steps == 4 and again.num_parameters() == pol.num_parameters()
    inp = _inputs()
    torch.testing.assert_close(pol(inp), again(inp), rtol=0, atol=0)
    assert "parameters" in describe(pol)


def test_weights_with_tensors_missing_or_not_finite_are_refused(tmp_path):
    """The hub mixin loads non-strictly by default: a weights file without the head's tensors gave
    a policy with its initial head, the untrained schedule, without a word."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    SchedulePolicy(steps=4, in_channels=4, token_dim=6, **TINY).eval().save_pretrained(tmp_path / "p")
    weights = tmp_path / "p" / "model.safetensors"
    saved = load_file(weights)
    save_file({k: v for k, v in saved.items() if not k.startswith("head.")}, weights)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*head\."):
        SchedulePolicy.from_pretrained(tmp_path / "p")
    with pytest.raises(RuntimeError, match="Missing key"):
        SchedulePolicy.from_pretrained(tmp_path / "p", strict=False)  # never what a policy wants
    save_file({**saved, "head.2.bias": torch.full_like(saved["head.2.bias"], float("nan"))}, weights)
    with pytest.raises(ValueError, match=r"weights of .* are not finite in 1 tensors \(head.2.bias\)"):
        SchedulePolicy.from_pretrained(tmp_path / "p")


def test_numpy_state_round_trip():
    torch.manual_seed(0)
    a = SchedulePolicy(steps=3, in_channels=4, token_dim=6, **TINY).eval()
    torch.manual_seed(1)
    b = SchedulePolicy(steps=3, in_channels=4, token_dim=6, **TINY).eval()
    load_numpy_state(b, state_to_numpy(a))
    inp = _inputs(b=2)
    torch.testing.assert_close(a(inp), b(inp), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_flat_state_loads_a_version_in_one_copy_as_tensor_by_tensor(dtype):
    torch.manual_seed(0)
    a = SchedulePolicy(steps=3, in_channels=4, token_dim=6, **TINY).eval()
    by_tensor = SchedulePolicy(steps=3, in_channels=4, token_dim=6, **TINY).eval()
    flat = SchedulePolicy(steps=3, in_channels=4, token_dim=6, **TINY).eval()
    kept = FlatState(flat)
    assert kept.flat is not None and kept.flat.numel() == flat.num_parameters()
    sent = state_to_numpy(a, dtype)
    load_numpy_state(by_tensor, sent)
    kept.load(sent)
    for k, v in by_tensor.state_dict().items():
        torch.testing.assert_close(flat.state_dict()[k], v, rtol=0, atol=0)
    inp = _inputs(b=2)
    torch.testing.assert_close(flat(inp), by_tensor(inp), rtol=0, atol=0)
    # the parameters are views of the buffer: one copy changed them all
    assert all(p.untyped_storage().data_ptr() == kept.flat.untyped_storage().data_ptr() for p in flat.parameters())
    other = SchedulePolicy(steps=4, in_channels=4, token_dim=6, **TINY).eval()  # another head: another layout
    with pytest.raises(ValueError, match=r"head\.2\.weight: shape \(4, 16\), the policy's \(5, 16\)"):
        FlatState(other).load(sent)


class _DeviceCrossings(TorchDispatchMode):
    """The ops that take a CPU tensor and give one on another device: (input dtype, output dtype)."""

    def __init__(self) -> None:
        super().__init__()
        self.crossings: list[tuple[torch.dtype, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        cpu_in = [a.dtype for a in args if isinstance(a, torch.Tensor) and a.device.type == "cpu"]
        if cpu_in and isinstance(out, torch.Tensor) and out.device.type != "cpu":
            self.crossings.append((cpu_in[-1], out.dtype))
        return out


@pytest.mark.parametrize("path", ["one copy", "tensor by tensor"])
def test_a_version_crosses_to_the_workers_device_as_sent_and_is_cast_there(path):
    # copy_ from the CPU to a GPU of another dtype casts on the CPU and sends the cast bytes; the
    # meta device stands in for the GPU (the same dispatch, no memory): the bfloat16 wire moves as
    # it is, and the cast to the policy's float32 happens on the device
    a = SchedulePolicy(steps=3, in_channels=4, token_dim=6, **TINY).eval()
    with torch.device("meta"):
        on_device = SchedulePolicy(steps=3, in_channels=4, token_dim=6, **TINY).eval()
    kept = FlatState(on_device)
    assert kept.flat is not None and kept.flat.device.type == "meta"
    sent = state_to_numpy(a, "bfloat16")
    with _DeviceCrossings() as log:
        kept.load(sent) if path == "one copy" else load_numpy_state(kept.state, sent)
    assert log.crossings and set(log.crossings) == {(torch.bfloat16, torch.bfloat16)}
    assert all(p.dtype == torch.float32 for p in on_device.parameters())


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_half_precision_broadcast_halves_the_bytes_and_rounds_once(dtype, torch_dtype):
    torch.manual_seed(0)
    a = SchedulePolicy(steps=3, in_channels=4, token_dim=6, **TINY).eval()
    b = SchedulePolicy(steps=3, in_channels=4, token_dim=6, **TINY).eval()
    full, half = state_to_numpy(a), state_to_numpy(a, dtype)
    assert half.dtype == dtype and half.nbytes * 2 == full.nbytes
    load_numpy_state(b, half)
    for k, v in a.state_dict().items():  # the worker's fp32 copy is the weight rounded to the wire dtype
        assert b.state_dict()[k].dtype == torch.float32
        torch.testing.assert_close(b.state_dict()[k], v.to(torch_dtype).float(), rtol=0, atol=0)
    inp = _inputs(b=2)
    torch.testing.assert_close(a(inp), b(inp), rtol=2e-2, atol=1e-3)


def test_devices_resolve_or_say_what_is_missing():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda:1': this process sees no GPU"):
            resolve_device("cuda:1")


def test_sample_log_tau_is_a_pure_function_of_the_key():
    alpha = np.array([0.5, 2.0, 3.0, 1.0])
    a = sample_log_tau(alpha, (0, 3, 7, 1))
    assert np.array_equal(a, sample_log_tau(alpha, (0, 3, 7, 1)))
    assert not np.array_equal(a, sample_log_tau(alpha, (0, 3, 7, 0)))
    assert a.dtype == np.float64 and abs(np.exp(a).sum() - 1) < 1e-12


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 12),
    st.integers(2, 9),
    st.lists(st.floats(-7.0, 4.0), min_size=108, max_size=108),
    st.lists(st.integers(0, 2**31), min_size=4, max_size=4),
)
def test_a_batch_of_draws_is_each_keys_own_draw_bit_for_bit(n, width, logs, base):
    """The worker draws its C x K schedules in one call: row i is exactly the draw of
    ``log_dirichlet`` from a generator of key i alone (the same random numbers, the same
    arithmetic), for concentrations from 1e-3 (components far below float64's smallest normal) up."""
    alpha = np.exp(np.asarray(logs[: n * width]).reshape(n, width))
    keys = [(base[0], base[1], base[2] + i, base[3] + i % 3) for i in range(n)]
    batch = sample_log_taus(alpha, keys)
    for i, key in enumerate(keys):
        one = log_dirichlet(alpha[i], np.random.default_rng(list(key)))
        assert batch[i].tobytes() == one.tobytes()
        assert sample_log_tau(alpha[i], key).tobytes() == one.tobytes()
    with pytest.raises(ValueError, match=r"expected alpha \[N, L\+1\] and N keys"):
        sample_log_taus(alpha, keys[:-1])


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from(["float32", "bfloat16", "float16"]),
    st.lists(
        st.tuples(
            st.integers(0, 200),
            st.sampled_from([np.inf, -np.inf, np.nan, 1e5, -7e4, 3e38, 1e-40, -0.0, 65504.0, 2.0**-24]),
        ),
        max_size=3,
    ),
)
def test_the_finite_check_of_a_broadcast_agrees_with_torch(dtype, values):
    """``Weights.nonfinite`` checks a numpy buffer with numpy (bfloat16 by its exponent bits): it
    finds exactly what ``torch.isfinite`` finds in the weights as sent, values that overflow the
    wire dtype included, and names the first tensor holding one."""
    policy = SchedulePolicy(steps=3, in_channels=4, token_dim=2, widths=(4, 4), head_hidden=8, input_kind="vector")
    flat = FlatState(policy.eval())
    with torch.no_grad():
        for at, value in values:
            flat.flat[at] = value
    sent = flat.weights(dtype)
    assert isinstance(sent.flat, np.ndarray)
    as_torch = Weights(sent.flat_tensor().clone(), sent.layout, dtype, sent.other)  # the torch path
    found = [name for name, t in sent.tensors().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    assert sent.nonfinite() == as_torch.nonfinite() == (found[0] if found else None)


def test_log_prob_matches_the_dirichlet_density():
    from scipy.stats import dirichlet

    alpha = torch.tensor([[0.7, 2.0, 3.5]], requires_grad=True)
    tau = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    lp = log_prob(alpha, tau.log())
    assert lp.dtype == torch.float64
    assert abs(float(lp.detach()) - dirichlet.logpdf(tau[0].numpy(), alpha.detach()[0].double().numpy())) < 1e-9
    lp.sum().backward()
    assert alpha.grad is not None and torch.isfinite(alpha.grad).all()


def test_collate_pads_and_masks():
    toks = [np.ones((2, 3), np.float32), np.ones((4, 3), np.float32)]
    inp = collate(np.zeros((2, 5), np.float32), toks, None)
    assert inp.tokens.shape == (2, 4, 3)
    assert inp.mask.tolist() == [[True, True, False, False], [True] * 4]
    with pytest.raises(ValueError):
        collate(np.zeros((3, 5), np.float32), toks, None)


def test_bad_variant_or_init():
    with pytest.raises(ValueError, match="variant"):
        SchedulePolicy(steps=3, in_channels=4, token_dim=6, variant="local")
    with pytest.raises(ValueError, match="default_tau"):
        SchedulePolicy(steps=3, in_channels=4, token_dim=6, init="default")


def test_max_concentration_caps_the_sum_and_keeps_the_mean():
    torch.manual_seed(0)
    kw = dict(
        steps=4,
        in_channels=4,
        token_dim=6,
        pooled_dim=6,
        init="default",
        default_tau=uniform_flow_tau(4).tolist(),
        concentration=200.0,
        **TINY,
    )
    free = SchedulePolicy(**kw).eval()
    torch.manual_seed(0)
    capped = SchedulePolicy(**kw, max_concentration=30.0).eval()
    a, b = free(_inputs()).detach().double(), capped(_inputs()).detach().double()
    np.testing.assert_allclose(b.sum(-1).numpy(), 30.0, rtol=1e-5)
    np.testing.assert_allclose((b / b.sum(-1, keepdim=True)).numpy(), (a / a.sum(-1, keepdim=True)).numpy(), atol=1e-6)
    torch.manual_seed(0)
    low = SchedulePolicy(**{**kw, "concentration": 10.0}, max_concentration=30.0).eval()
    np.testing.assert_allclose(
        low(_inputs()).detach().double().sum(-1).numpy(), 10.0, rtol=1e-4
    )  # below the cap: untouched


def test_alpha_min_floors_alpha():
    torch.manual_seed(0)
    pol = SchedulePolicy(
        steps=4, in_channels=4, token_dim=6, pooled_dim=6, init="scratch", alpha_min=1.0, **TINY
    ).eval()
    assert bool((pol(_inputs()) > 1.0).all())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_flat_states_weights_are_state_to_numpys_bytes_and_a_copy(dtype):
    """The learner's broadcast from its flat buffer: the same bytes and layout as ``state_to_numpy``,
    and a copy (the next update changes the buffer, not a version already sent)."""
    torch.manual_seed(0)
    pol = SchedulePolicy(steps=3, in_channels=4, token_dim=6, **TINY).eval()
    kept = FlatState(pol)
    assert kept.holds_parameters and kept.parameters == list(pol.parameters())
    sent, expected = kept.weights(dtype), state_to_numpy(pol, dtype)
    assert sent.dtype == dtype and sent.layout == expected.layout and not sent.other
    assert sent.flat.tobytes() == expected.flat.tobytes()
    with torch.no_grad():
        next(pol.parameters()).add_(1.0)
    assert sent.flat.tobytes() == expected.flat.tobytes()


def test_a_policy_on_a_flat_buffer_saves_and_loads(tmp_path):
    """safetensors refuses views of one storage as they are; the policy copies them out."""
    torch.manual_seed(0)
    pol = SchedulePolicy(steps=3, in_channels=4, token_dim=6, **TINY).eval()
    FlatState(pol)
    pol.save_pretrained(tmp_path / "p")
    again = SchedulePolicy.from_pretrained(tmp_path / "p").eval()
    inp = _inputs(b=2)
    torch.testing.assert_close(pol(inp), again(inp), rtol=0, atol=0)


def test_a_flat_state_with_a_buffer_does_not_claim_to_hold_only_the_parameters():
    model = torch.nn.BatchNorm1d(3)  # weight, bias and the float running stats, in one buffer
    kept = FlatState(model)
    assert kept.flat is not None and not kept.holds_parameters
