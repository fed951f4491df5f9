"""rollout.export: a trained policy's schedule as keyword arguments of a stock diffusers pipeline.

On the tiny Flux, SD3 and SDXL pipelines (tests/fixtures/tiny_pipelines.py), float32 on the CPU:
the image of ``pipe(prompt, **kwargs)``, the pipeline and its scheduler left as they are, equals
to 1e-5 the image our backend makes with the same schedule and noise (the flow schedulers'
shift is undone in the sigmas given, not switched off). A pipeline of another class, or a
scheduler that cannot run the schedule, is refused with a message that names it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from common.config import PolicyConfig
from common.policy import SchedulePolicy, policy_kwargs
from rollout.export import PipelineSchedule, pipeline_kwargs
from tests.fixtures.tiny_pipelines import SIZE, tiny_pipeline
from tests.unit.test_backends import build

PROMPT = "a photo of a cat"
TINY = PolicyConfig(widths=[8, 8, 16, 16], groups=4, attn_heads=2, head_hidden=16, init="scratch")


def _policy(sampler, variant: str = "conditional", steps: int = 3) -> SchedulePolicy:
    torch.manual_seed(0)
    cfg = TINY.model_copy(update={"variant": variant})
    return SchedulePolicy(**policy_kwargs(cfg, sampler.spec(), steps, sampler.default_tau(steps))).eval()


def _export_args(family: str) -> dict:
    return {"height": SIZE, "width": SIZE, **({"max_sequence_length": 32} if family in ("flux", "sd3") else {})}


@pytest.mark.parametrize("family", ["flux", "sd3", "sdxl"])
def test_the_stock_pipeline_runs_the_learned_schedule(family):
    """As the docs call it, ``pipe(prompt, **schedule(prompt, seed=...))``: the guidance (SD3 at
    4.0 and SDXL at 7.5 here, where the pipelines' defaults are 7.0 and 5.0) and the T5 length
    of training come with the schedule. They were left to the pipeline's defaults: SD3 at 3.5
    differed from its training images by 0.085."""
    case = build(family)
    policy = _policy(case.sampler)
    assert policy.pipeline == type(case.pipe).__name__ and policy.time_convention
    assert policy.call_kwargs == {**case.stock_kwargs, **({"negative_prompt": None} if family != "flux" else {})}
    schedule = PipelineSchedule(policy, case.pipe, height=SIZE, width=SIZE)  # the T5 length: the training's
    for seed in (3, 4):
        kwargs = schedule(PROMPT, seed=seed)
        assert {k: kwargs[k] for k in case.stock_kwargs} == case.stock_kwargs and kwargs["num_images_per_prompt"] == 1
        stock = case.pipe(PROMPT, **kwargs, output_type="np").images[0]
        noise = case.sampler.initial_noise([seed])
        times = schedule.times(PROMPT, noise[0])
        assert len(times) == 3 and not np.allclose(times, times_default(case.sampler, 3))
        ours = case.sampler.generate([PROMPT], noise, times[None])[0]
        assert np.abs(stock - ours).max() <= 1e-5, family
    # the one-call form gives the same arguments
    one = pipeline_kwargs(policy, case.pipe, PROMPT, seed=3, **_export_args(family))
    again = schedule(PROMPT, seed=3)
    assert torch.equal(one["latents"], again["latents"])
    assert {k: v for k, v in one.items() if k != "latents"} == {k: v for k, v in again.items() if k != "latents"}


def times_default(sampler, steps):
    from common.schedule import times_from_tau

    return times_from_tau(sampler.default_tau(steps))


def test_a_global_policy_exports_a_plain_list():
    case = build("flux")
    policy = _policy(case.sampler, variant="global")
    with torch.no_grad():
        policy.h.copy_(torch.tensor([0.5, 2.0, 1.0, 3.0]))
    schedule = PipelineSchedule(policy, case.pipe, **_export_args("flux"))
    plain = schedule.global_schedule()
    assert isinstance(plain["sigmas"], list) and len(plain["sigmas"]) == 3 and plain["num_inference_steps"] == 3
    noise = case.sampler.initial_noise([7])
    gen = torch.Generator("cpu").manual_seed(7)  # the pipeline draws the same x_T from this generator
    stock = case.pipe(PROMPT, **plain, generator=gen, output_type="np").images[0]  # the training's guidance in it
    from common.schedule import times_from_tau

    times = times_from_tau(np.asarray(policy.global_mean_tau()))
    ours = case.sampler.generate([PROMPT], noise, times[None])[0]
    assert np.abs(stock - ours).max() <= 1e-5


def test_a_pipeline_it_was_not_trained_for_is_refused():
    flux = build("flux")
    policy = _policy(flux.sampler)
    with pytest.raises(ValueError, match="trained for a FluxPipeline .* not a StableDiffusion3Pipeline"):
        PipelineSchedule(policy, tiny_pipeline("sd3"))
    bare = SchedulePolicy(steps=3, in_channels=4, token_dim=8, variant="global")
    with pytest.raises(ValueError, match="does not record the pipeline it was trained for"):
        PipelineSchedule(bare, flux.pipe)
    with pytest.raises(ValueError, match="give exactly one of seed or generator"):
        PipelineSchedule(policy, flux.pipe, **_export_args("flux"))(PROMPT)
    # seeds as the tools take them: 2**63 gave seed 0's noise and schedule, 1.5 seed 1's; "0" and -1 were taken
    for seed in (2**63, 1.5, "0", -1, True):
        with pytest.raises(ValueError, match=r"seed must be an integer from 0 to 4611686018427387904, got "):
            PipelineSchedule(policy, flux.pipe, **_export_args("flux"))(PROMPT, seed=seed)
    assert PipelineSchedule(policy, flux.pipe, **_export_args("flux"))(PROMPT, seed=np.int64(2))["latents"] is not None
    schedule = PipelineSchedule(policy, flux.pipe, **_export_args("flux"))
    with pytest.raises(TypeError, match=r"^generator must be a torch.Generator, got int 5$"):  # was torch's randn()
        schedule(PROMPT, generator=5)
    for prompt, why in (("", "is empty"), ("a\x00b", "control character")):  # the tools refuse them too
        with pytest.raises(ValueError, match=rf"^prompt: prompt 1 .*{why}"):
            schedule(prompt, seed=0)
    with pytest.raises(ValueError, match=r"height.*less than or equal to 16384"):  # was a warning, then [4, 500000, 16]
        PipelineSchedule(policy, flux.pipe, height=10**6, width=SIZE)
    # another image size than the policy's training: a schedule from an input it never saw, silently
    assert policy.x_shape == list(flux.sampler.x_shape)
    with pytest.warns(UserWarning, match=r"read noise of shape \[.*\] in training; at this height and width the"):
        PipelineSchedule(policy, flux.pipe, **{**_export_args("flux"), "height": 2 * SIZE, "width": 2 * SIZE})
    loaded = SchedulePolicy(
        **{**policy_kwargs(TINY, flux.sampler.spec(), 3, flux.sampler.default_tau(3)), "x_shape": None}
    )
    PipelineSchedule(loaded, flux.pipe, height=2 * SIZE, width=2 * SIZE)  # a policy saved before it was recorded
    # noise of another number of channels (another model's pipeline of the same class): refused at once,
    # where it was the size warning, then torch's conv error on the first call
    spec = flux.sampler.spec()
    other = SchedulePolicy(
        **{
            **policy_kwargs(TINY, spec, 3, flux.sampler.default_tau(3)),
            "in_channels": 2 * spec.x_shape[0],
            "x_shape": [2 * spec.x_shape[0], *spec.x_shape[1:]],
        }
    )
    with pytest.raises(ValueError, match=r"makes noise of shape \[.*\]: another number of latent channels"):
        PipelineSchedule(other, flux.pipe, **_export_args("flux"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_policy_cast_to_half_precision_gives_the_schedule(dtype):
    """A policy cast with ``.to(torch.bfloat16)`` (as a pipeline is) reads the float32 noise and
    text embeddings in its own precision and gives float32 alphas: the same schedule to that
    precision (it was torch's dtype error in the first layer)."""
    case = build("sdxl")
    policy = _policy(case.sampler)
    exact = PipelineSchedule(policy, case.pipe, **_export_args("sdxl"))
    half = PipelineSchedule(_policy(case.sampler).to(dtype), case.pipe, **_export_args("sdxl"))
    noise = exact.noise(seed=5)
    assert np.abs(half.times(PROMPT, noise) - exact.times(PROMPT, noise)).max() < 2e-2
    assert half(PROMPT, seed=5)["timesteps"] is not None


def test_careless_calls_are_one_clear_error(tmp_path):
    """A path for the policy is loaded (it was an AttributeError on the str); a batch of prompts,
    a size or a T5 length out of range are named (an unhashable-list TypeError from a cache, a
    pydantic block with a URL; a length of 0 meant the default, 512)."""
    flux = build("flux")
    policy = _policy(flux.sampler)
    policy.save_pretrained(tmp_path / "policy")
    from_path = PipelineSchedule(str(tmp_path / "policy"), flux.pipe, **_export_args("flux"))
    direct = PipelineSchedule(policy, flux.pipe, **_export_args("flux"))
    assert torch.equal(from_path(PROMPT, seed=1)["latents"], direct(PROMPT, seed=1)["latents"])
    assert from_path(PROMPT, seed=1)["sigmas"] == direct(PROMPT, seed=1)["sigmas"]
    with pytest.raises(TypeError, match="policy must be a SchedulePolicy or the path of a saved one, got a dict"):
        PipelineSchedule({}, flux.pipe)
    with pytest.raises(TypeError, match=r"prompt must be one str \(call once per prompt"):
        direct(["a cat", "a dog"], seed=0)
    for bad, field in [({"height": 0}, "height"), ({"max_sequence_length": 0}, "max_sequence_length")]:
        with pytest.raises(ValueError) as e:
            PipelineSchedule(policy, flux.pipe, **{**_export_args("flux"), **bad})
        assert str(e.value).startswith(f"PipelineSchedule: {field}: ") and "\n" not in str(e.value)


def test_a_scheduler_that_cannot_run_the_schedule_is_refused():
    sd15 = build("sd15")
    policy = _policy(sd15.sampler)
    pipe = tiny_pipeline("sd15")  # ships PNDM, as SD1.5 does
    with pytest.raises(ValueError, match="EulerDiscreteScheduler.from_config"):
        PipelineSchedule(policy, pipe)
    from diffusers import EulerDiscreteScheduler

    # it ran, and stopped at sigma_min: 1e-3 from the backend's image where the stock config gives 2e-7
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, final_sigmas_type="sigma_min")
    with pytest.raises(ValueError, match=r"EulerDiscreteScheduler with final_sigmas_type='sigma_min' \(it stops short"):
        PipelineSchedule(policy, pipe)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, final_sigmas_type="zero")
    PipelineSchedule(policy, pipe)


def test_the_line_a_scheduler_refusal_gives_fixes_it_in_one_go():
    """Each refusal gives one line to run. An Euler scheduler with log_linear interpolation was told
    ``EulerDiscreteScheduler.from_config(pipe.scheduler.config)``, which kept log_linear: the same
    refusal again; a fix of one setting met the next one's refusal."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    case = build("sdxl")
    policy = _policy(case.sampler)
    stock = case.pipe.scheduler
    bad = [
        EulerDiscreteScheduler.from_config(stock.config, interpolation_type="log_linear"),
        EulerDiscreteScheduler.from_config(
            stock.config, interpolation_type="log_linear", use_karras_sigmas=True, final_sigmas_type="sigma_min"
        ),
        DPMSolverMultistepScheduler.from_config(stock.config, use_karras_sigmas=True),
    ]
    try:
        for scheduler in bad:
            case.pipe.scheduler = scheduler
            with pytest.raises(ValueError) as e:
                PipelineSchedule(policy, case.pipe, height=SIZE, width=SIZE)
            line = str(e.value).split(": set ", 1)[1]
            assert "\n" not in line and line.startswith("pipe.scheduler = EulerDiscreteScheduler.from_config("), line
            pipe = case.pipe
            exec(line, {"EulerDiscreteScheduler": EulerDiscreteScheduler, "pipe": pipe})  # as the user runs it
            schedule = PipelineSchedule(policy, pipe, height=SIZE, width=SIZE)  # taken
            kwargs = schedule(PROMPT, seed=3)
            stock_image = pipe(PROMPT, **kwargs, output_type="np").images[0]
            noise = case.sampler.initial_noise([3])
            ours = case.sampler.generate([PROMPT], noise, schedule.times(PROMPT, noise[0])[None])[0]
            assert np.abs(stock_image - ours).max() <= 1e-5, line
    finally:
        case.pipe.scheduler = stock


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_a_scheduler_swapped_in_after_the_schedule_was_made_is_refused_at_the_call(family):
    """The scheduler was checked when the ``PipelineSchedule`` was built only: one swapped in after
    it (a user trying another sampler) ran the learned schedule as other times, without a word
    (SDXL with DPM-Solver: 0.027 from the training image; Flux with Karras sigmas 0.012)."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    case = build(family)
    schedule = PipelineSchedule(_policy(case.sampler), case.pipe, **_export_args(family))
    schedule(PROMPT, seed=0)
    stock = case.pipe.scheduler
    if family == "sdxl":
        swapped = DPMSolverMultistepScheduler.from_config(stock.config)
    else:
        swapped = FlowMatchEulerDiscreteScheduler.from_config(stock.config, use_karras_sigmas=True)
    try:
        case.pipe.scheduler = swapped
        with pytest.raises(ValueError, match=type(swapped).__name__):
            schedule(PROMPT, seed=0)
        with pytest.raises(ValueError, match=type(swapped).__name__):
            schedule.schedule_kwargs(np.array([0.9, 0.5, 0.1]))  # a global schedule's path too
    finally:
        case.pipe.scheduler = stock
    schedule(PROMPT, seed=0)  # set back: taken


def test_a_model_predicting_otherwise_than_in_training_is_refused():
    """An SD pipeline whose scheduler says v_prediction (a v-prediction fine-tune of the same
    architecture) took an epsilon-trained policy's schedule: 0.56 from its training image. A policy
    saved before the prediction was recorded is taken as before."""
    from diffusers import EulerDiscreteScheduler

    case = build("sdxl")
    policy = _policy(case.sampler)
    assert policy.reads["prediction_type"] == "epsilon"
    stock = case.pipe.scheduler
    try:
        case.pipe.scheduler = EulerDiscreteScheduler.from_config(stock.config, prediction_type="v_prediction")
        with pytest.raises(ValueError, match=r"^this policy was trained on a model predicting 'epsilon'; this pipe"):
            PipelineSchedule(policy, case.pipe, height=SIZE, width=SIZE)
        policy.reads = {k: v for k, v in policy.reads.items() if k != "prediction_type"}  # an older policy
        PipelineSchedule(policy, case.pipe, height=SIZE, width=SIZE)
    finally:
        case.pipe.scheduler = stock


def test_a_global_schedule_for_a_list_of_prompts_gives_the_negative_prompt_as_a_list():
    """SD1.x's pipeline refuses a str negative prompt beside a list of prompts (TypeError), so the
    documented ``pipe(prompts, **plain)`` failed for a run trained with one."""
    case = build("sd15", negative_prompt="blurry")
    policy = _policy(case.sampler, variant="global")
    schedule = PipelineSchedule(policy, case.pipe, height=SIZE, width=SIZE)
    assert schedule.global_schedule()["negative_prompt"] == "blurry"
    prompts = [PROMPT, "a dog"]
    plain = schedule.global_schedule(batch=len(prompts))
    assert plain["negative_prompt"] == ["blurry", "blurry"]
    both = case.pipe(prompts, **plain, generator=torch.Generator().manual_seed(0), output_type="np").images
    alone = [
        case.pipe(p, **schedule.global_schedule(), latents=torch.from_numpy(n[None]), output_type="np").images[0]
        for p, n in zip(prompts, case.sampler.initial_noise([0, 0]), strict=True)
    ]
    assert both.shape[0] == 2 and np.isfinite(both).all() and np.abs(both[0] - alone[0]).max() <= 1e-5
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"^batch must be the number of prompts"):
            schedule.global_schedule(batch=bad)


def test_align_your_steps_is_offered_where_diffusers_has_it():
    """The evaluation's AYS row: SD1.5 and SDXL have it (their AysSchedules, at any L), flows not."""
    from types import SimpleNamespace

    from common.schedule import check_tau, epsilon_sigmas, times_from_tau, uniform_flow_tau
    from rollout.worker import RolloutWorker

    for family, key in (("sd15", "StableDiffusionSigmas"), ("sdxl", "StableDiffusionXLSigmas")):
        from diffusers.schedulers import AysSchedules

        s = build(family).sampler
        tau = s.ays_tau(10)
        check_tau(tau, 10)
        sig = epsilon_sigmas(times_from_tau(tau), s.family.train_sigmas)
        np.testing.assert_allclose(sig[1:], AysSchedules[key][1:-1], rtol=1e-4)
        check_tau(s.ays_tau(4), 4)
    flux = build("flux").sampler
    assert flux.ays_tau(4) is None
    # what learner.evaluate asks each worker for: AYS where there is one, None (no row) elsewhere
    worker = SimpleNamespace(sampler=s)  # the sdxl sampler of the loop above
    np.testing.assert_allclose(RolloutWorker.named_tau(worker, "ays", 4), s.ays_tau(4))
    assert RolloutWorker.named_tau(SimpleNamespace(sampler=flux), "ays", 4) is None
    assert RolloutWorker.named_tau(worker, "uniform", 4) == uniform_flow_tau(4).tolist()
    with pytest.raises(ValueError, match="unknown schedule 'karras'"):
        RolloutWorker.named_tau(worker, "karras", 4)


def _unreachable(*args, **kwargs):
    import socket

    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        raise socket.gaierror(-2, "Name or service not known")
    except socket.gaierror as e:
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub") from e


def _not_on_the_hub(error: str):
    """A hub download answered 404 with ``error`` (RepositoryNotFoundError, EntryNotFoundError: the
    client's remote kind where it has one)."""
    from huggingface_hub import errors

    kind = getattr(errors, "RemoteEntryNotFoundError" if error == "EntryNotFoundError" else error, None)
    kind = kind or getattr(errors, error)

    def download(*args, **kwargs):
        raise kind.__new__(kind)  # not built from an HTTP response: nothing here reads one

    return download


def test_a_saved_policy_that_cannot_be_read_is_one_line_naming_it(tmp_path, monkeypatch):
    """A policy given by where it was saved: read as the command-line tools read it. Before, a
    missing directory was huggingface_hub's 'Repo id must be in the form ...', a damaged file the
    safetensors or JSON error naming no file, a directory without config.json a TypeError."""
    import huggingface_hub.hub_mixin

    from common.config import ConfigError

    flux = build("flux")
    saved = tmp_path / "run" / "policy"
    _policy(flux.sampler).save_pretrained(saved)
    args = _export_args("flux")
    assert PipelineSchedule(str(saved), flux.pipe, **args)(PROMPT, seed=0)["latents"] is not None
    for where in (tmp_path / "nowhere", "runs/x/policy", "./policy"):
        with pytest.raises(ValueError, match=r"policy '.*': no such directory; give the directory of a saved policy"):
            PipelineSchedule(where, flux.pipe, **args)
    with pytest.raises(ValueError, match=r"is a file; give the directory of a saved policy"):
        PipelineSchedule(saved / "config.json", flux.pipe, **args)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"^the policy in .*empty cannot be loaded: its config\.json is missing$"):
        PipelineSchedule(empty, flux.pipe, **args)
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"^the policy in .*policy cannot be loaded \(SafetensorError: ") as e:
        PipelineSchedule(saved, flux.pipe, **args)
    assert "\n" not in str(e.value)
    # a hub id, with the hub out of reach: one line, not five retries and the client's message
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _unreachable)
    monkeypatch.setattr(huggingface_hub.hub_mixin, "hf_hub_download", _unreachable)
    with pytest.raises(OSError, match=r"^policy 'someone/policy' is neither a local path nor in the hub cache, and"):
        PipelineSchedule("someone/policy", flux.pipe, **args)
    # a mistyped directory taken for a hub id the hub does not have (or a repo without the policy's
    # config): before, the hub mixin built the policy without arguments, a TypeError of its __init__
    for error, why in (("RepositoryNotFoundError", "no such repo"), ("EntryNotFoundError", "no config.json")):
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", _not_on_the_hub(error))
        monkeypatch.setattr(huggingface_hub.hub_mixin, "hf_hub_download", _not_on_the_hub(error))
        with pytest.raises(ValueError, match=rf"^policy 'run/policy': no such directory, and on the hub {why}"):
            PipelineSchedule("run/policy", flux.pipe, **args)


def test_the_training_settings_are_saved_with_the_policy_and_overridable():
    case = build("sd3")
    policy = _policy(case.sampler)
    saved = PipelineSchedule(_roundtrip(policy), case.pipe, height=SIZE, width=SIZE)
    assert saved.call_kwargs == {"guidance_scale": 4.0, "negative_prompt": None, "max_sequence_length": 32}
    # a user's own T5 length is theirs, in the policy's reading and the pipeline's call
    assert PipelineSchedule(policy, case.pipe, height=SIZE, width=SIZE, max_sequence_length=16).call_kwargs == {
        "guidance_scale": 4.0,
        "negative_prompt": None,
        "max_sequence_length": 16,
    }
    kwargs = saved(PROMPT, seed=0)
    sdxl = build("sdxl")  # a T5 length given for a pipeline that takes none is not passed on to it
    assert (
        "max_sequence_length"
        not in PipelineSchedule(
            _policy(sdxl.sampler), sdxl.pipe, height=SIZE, width=SIZE, max_sequence_length=32
        ).call_kwargs
    )
    with pytest.raises(TypeError, match="multiple values for keyword argument 'num_images_per_prompt'"):
        case.pipe(PROMPT, num_images_per_prompt=2, **kwargs)  # one image: its noise and schedule are its own
    # a policy saved before the settings were recorded: the schedule alone, as before
    old = SchedulePolicy(
        **{**policy_kwargs(TINY, case.sampler.spec(), 3, case.sampler.default_tau(3)), "call_kwargs": None}
    )
    assert "guidance_scale" not in PipelineSchedule(old, case.pipe, height=SIZE, width=SIZE, max_sequence_length=32)(
        PROMPT, seed=0
    )


def _roundtrip(policy: SchedulePolicy) -> SchedulePolicy:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        policy.save_pretrained(d)
        return SchedulePolicy.from_pretrained(d).eval()


def test_a_pipeline_set_up_otherwise_than_in_training_is_refused_saying_how_to_set_it():
    """An SD scheduler of other settings (the initial noise's spacing rule, the betas), or SD3
    without its T5 encoder, gave another image than training's from the same schedule, or the
    policy CLIP tokens for T5 ones, without a word (SDXL with 'trailing': 8e-3 off its image)."""
    from diffusers import EulerDiscreteScheduler

    case = build("sdxl")
    policy = _roundtrip(_policy(case.sampler))  # what it records survives its saving
    spacing = case.pipe.scheduler.config.timestep_spacing
    assert policy.reads is not None and policy.reads["timestep_spacing"] == spacing
    other = "trailing" if spacing != "trailing" else "leading"
    stock = case.pipe.scheduler
    try:
        case.pipe.scheduler = EulerDiscreteScheduler.from_config(stock.config, timestep_spacing=other)
        with pytest.raises(ValueError) as e:
            PipelineSchedule(policy, case.pipe, height=SIZE, width=SIZE)
        assert str(e.value) == (
            f"this policy was trained with the scheduler's timestep_spacing={spacing!r}; this pipeline's has"
            f" timestep_spacing={other!r}, under which its times are another image: set pipe.scheduler ="
            f" EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing={spacing!r})"
        )
        case.pipe.scheduler = EulerDiscreteScheduler.from_config(stock.config, timestep_spacing=spacing)
        PipelineSchedule(policy, case.pipe, height=SIZE, width=SIZE)  # as in training: taken
    finally:
        case.pipe.scheduler = stock
    case = build("sd3")
    policy = _policy(case.sampler)
    assert policy.reads == {"text_tokens": "t5"}
    t5 = case.pipe.text_encoder_3
    try:
        case.pipe.text_encoder_3 = None  # as diffusers suggests to save memory
        with pytest.raises(ValueError, match=r"^this policy read the T5 text tokens in training; this pipeline has no"):
            PipelineSchedule(policy, case.pipe, **_export_args("sd3"))
    finally:
        case.pipe.text_encoder_3 = t5


def test_the_user_s_pipeline_is_left_as_it_is():
    """Building a PipelineSchedule turned every module's gradients and the process's progress bars
    off and moved the pipeline (``pipe.to``: with CPU offload, the whole model onto the GPU); its
    calls kept the encoder outputs of up to 256 prompts on the pipeline's device."""
    import diffusers

    case = build("flux")
    policy = _policy(case.sampler)
    diffusers.utils.logging.enable_progress_bar()
    case.pipe.transformer.requires_grad_(True)
    case.pipe.set_progress_bar_config(disable=False)
    try:
        schedule = PipelineSchedule(policy, case.pipe, height=SIZE, width=SIZE)
        for prompt in (PROMPT, "a red cube", "a blue sphere", PROMPT):
            schedule(prompt, seed=0)
        # the encoder outputs of the last prompt only are kept on the pipeline's device (the cache
        # of the training's workers, 256 prompts, held a GiB of T5 outputs for Flux)
        assert len(schedule.sampler._cache) == 1
        assert all(p.requires_grad for p in case.pipe.transformer.parameters())
        assert diffusers.utils.logging.is_progress_bar_enabled()
        assert case.pipe._progress_bar_config == {"disable": False}
    finally:
        diffusers.utils.logging.disable_progress_bar()
        case.pipe.transformer.requires_grad_(False)


def test_a_policy_of_another_model_or_a_scheduler_it_cannot_use_is_refused_at_once():
    """Another model of the same pipeline class (SD2 for SD1.5: other text widths) was let through,
    then torch's attention shape assertion and a size warning that advised another height; an SD
    Euler scheduler with Karras sigmas was diffusers' 'Cannot set `timesteps`' at the call; a
    shift changed with ``set_shift`` was ignored (0.045 from the training image)."""
    sdxl = build("sdxl")
    spec = sdxl.sampler.spec()
    other = SchedulePolicy(
        **{**policy_kwargs(TINY, spec, 3, sdxl.sampler.default_tau(3)), "token_dim": 2 * spec.token_dim}
    )
    with pytest.raises(ValueError, match=rf"read text tokens of width {2 * spec.token_dim} and a pooled embedding of"):
        PipelineSchedule(other, sdxl.pipe, height=SIZE, width=SIZE)
    from diffusers import EulerDiscreteScheduler

    karras = EulerDiscreteScheduler.from_config(sdxl.pipe.scheduler.config, use_karras_sigmas=True)
    sdxl.pipe.scheduler, euler = karras, sdxl.pipe.scheduler
    try:
        with pytest.raises(
            ValueError, match=r"with use_karras_sigmas=True: .*from_config\(.*use_karras_sigmas=False\)"
        ):
            PipelineSchedule(_policy(sdxl.sampler), sdxl.pipe, height=SIZE, width=SIZE)
    finally:
        sdxl.pipe.scheduler = euler
    sd3 = build("sd3")
    sd3.pipe.scheduler.set_shift(5.0)
    schedule = PipelineSchedule(_policy(sd3.sampler), sd3.pipe, height=SIZE, width=SIZE)
    noise = sd3.sampler.initial_noise([2])
    stock = sd3.pipe(PROMPT, **schedule(PROMPT, seed=2), output_type="np").images[0]
    ours = sd3.sampler.generate([PROMPT], noise, schedule.times(PROMPT, noise[0])[None])[0]
    assert np.abs(stock - ours).max() <= 1e-5


def test_an_sd_time_below_the_least_noisy_timestep_is_said_and_runs_at_timestep_0():
    """Training runs t < 1/T at timestep 0 with a sigma below the model's lowest; a stock Euler
    scheduler can only run the lowest. The timestep given was t*T - 1 < 0 (the UNet saw a negative
    timestep), silently."""
    case = build("sdxl")
    schedule = PipelineSchedule(_policy(case.sampler), case.pipe, height=SIZE, width=SIZE)
    with pytest.warns(UserWarning, match=r"at t = 0.0003, below its least noisy training timestep \(t = 1/1000\)"):
        low = schedule.schedule_kwargs(np.array([0.9, 0.3, 0.0003]))
    assert low["timesteps"][-1] == 0.0 and low["timesteps"][0] == pytest.approx(899.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert schedule.schedule_kwargs(np.array([0.9, 0.3, 0.001]))["timesteps"][-1] == pytest.approx(0.0)
        assert schedule.schedule_kwargs(np.array([0.9, 0.3, 0.000999]))["timesteps"][-1] == 0.0  # 0.1% below


def test_run_as_a_command_it_says_how_it_is_used():
    """``python -m rollout.export`` did nothing and exited 0: it is a Python API."""
    import subprocess
    import sys

    from tests.conftest import REPO

    command = [sys.executable, "-m", "rollout.export"]
    res = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        "rollout.export is used from Python: schedule = PipelineSchedule(policy, pipe); pipe(prompt,"
        " **schedule(prompt, seed=0)) (docs/use.md); for images from a run, python -m rollout.generate --run DIR"
    ]
