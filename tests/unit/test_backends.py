"""The diffusers backends on tiny random pipelines (tests/fixtures/tiny_pipelines.py), float32 on the CPU:

(a) with the default schedule our per-sample loop reproduces the stock diffusers pipeline (SD1.5
    and SDXL: with EulerDiscreteScheduler) for the same prompt and latents, to 1e-4;
(b) a batch of samples with different schedules equals the same samples run one at a time;
and any schedule matches the stock pipeline told to run that schedule (tests/fixtures/stock_reference.py).
Both also run in bfloat16: on the CPU, and on CUDA under the ``gpu`` marker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from common.config import FluxConfig, SD3Config, SDConfig
from common.schedule import check_tau, guard_tau, times_from_tau
from rollout.backends.diffusers_common import DiffusersSampler
from rollout.sampler import Sampler
from tests.fixtures.tiny_pipelines import FAMILIES, SIZE, tiny_pipeline

PROMPTS = ["a photo of a cat", "an oil painting of a red fox in the snow, highly detailed"]
TOL = 1e-4  # max abs difference of float images in [0, 1] (the bar)


@dataclass
class Case:
    family: str
    pipe: object
    sampler: Sampler
    stock_kwargs: dict

    def stock(
        self, prompt: str, steps: int, latents: torch.Tensor | None = None, seed: int | None = None
    ) -> np.ndarray:
        """The stock pipeline's float image for one prompt, from ``latents`` or a CPU generator."""
        kwargs = dict(self.stock_kwargs, height=SIZE, width=SIZE, num_inference_steps=steps, output_type="np")
        if latents is not None:
            if self.family == "flux":
                from diffusers import FluxPipeline

                latents = FluxPipeline._pack_latents(latents, 1, *latents.shape[1:])
            kwargs["latents"] = latents
        else:
            kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
        return self.pipe(prompt, **kwargs).images[0]


def build(family: str, device: str = "cpu", dtype: str = "float32", **over) -> Case:
    from diffusers import EulerDiscreteScheduler

    pipe = tiny_pipeline(family)
    common = {"model": "tiny", "device": device, "dtype": dtype, "height": SIZE, "width": SIZE, **over}
    if family == "flux":
        from rollout.backends.flux import FluxFamily

        cfg = FluxConfig(**{"max_sequence_length": 32, "guidance_scale": 3.5, **common})
        pipe.to(device, getattr(torch, dtype))
        sampler = DiffusersSampler(FluxFamily, pipe, cfg)
        stock = {"guidance_scale": cfg.guidance_scale, "max_sequence_length": cfg.max_sequence_length}
    elif family == "sd3":
        from rollout.backends.sd3 import SD3Family

        cfg = SD3Config(**{"max_sequence_length": 32, "guidance_scale": 4.0, **common})
        pipe.to(device, getattr(torch, dtype))
        sampler = DiffusersSampler(SD3Family, pipe, cfg)
        stock = {
            "guidance_scale": cfg.guidance_scale,
            "max_sequence_length": cfg.max_sequence_length,
            "negative_prompt": cfg.negative_prompt,
        }
    else:
        from rollout.backends.sd import SDFamily

        cfg = SDConfig(**{"guidance_scale": 7.5, **common})
        pipe.to(device, getattr(torch, dtype))
        sampler = DiffusersSampler(SDFamily, pipe, cfg)
        # the stock pipeline with its EulerDiscreteScheduler, as a user swaps it in
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        stock = {"guidance_scale": cfg.guidance_scale, "negative_prompt": cfg.negative_prompt}
    return Case(family, pipe, sampler, stock)


@pytest.fixture(scope="module", params=FAMILIES)
def case(request) -> Case:
    return build(request.param)


def _default_times(sampler, steps: int, n: int) -> np.ndarray:
    return np.tile(times_from_tau(sampler.default_tau(steps)), (n, 1))


def _random_times(steps: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return times_from_tau(guard_tau(rng.dirichlet(np.full(steps + 1, 2.0), size=n)))


@pytest.mark.parametrize("steps", [1, 5])
def test_default_schedule_reproduces_the_stock_pipeline(case: Case, steps: int):
    s = case.sampler
    check_tau(s.default_tau(steps), steps)
    noise = s.initial_noise([11, 12])
    ours = s.generate(PROMPTS, noise, _default_times(s, steps, 2))
    for i, prompt in enumerate(PROMPTS):
        ref = case.stock(prompt, steps, latents=torch.from_numpy(noise[i : i + 1]))
        assert ref.shape == ours[i].shape == (SIZE, SIZE, 3)
        assert np.abs(ref - ours[i]).max() <= TOL, case.family
    # x_T is what the stock pipeline draws from the same seed with a CPU generator
    ref = case.stock(PROMPTS[0], steps, seed=11)
    assert np.abs(ref - ours[0]).max() <= TOL


def test_any_schedule_matches_the_stock_pipeline_on_that_schedule(case: Case):
    """Beyond the default: the stock pipeline told to run our schedule (shift off for flows, custom
    timesteps t*T - 1 for Euler) gives the same image as our loop."""
    from tests.fixtures.stock_reference import stock_generate, stock_pipeline_for_schedules

    s, L = case.sampler, 4
    stock = stock_pipeline_for_schedules(case.pipe)
    noise = s.initial_noise([5, 6])
    times = _random_times(L, 2, seed=9)
    ours = s.generate(PROMPTS, noise, times)
    for i, prompt in enumerate(PROMPTS):
        ref = stock_generate(stock, prompt, noise[i], times[i], SIZE, SIZE, **case.stock_kwargs)
        assert np.abs(ref - ours[i]).max() <= TOL, case.family


def test_batch_of_schedules_equals_one_at_a_time(case: Case):
    s, L = case.sampler, 4
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[1]]
    noise = s.initial_noise([3, 3, 4, 5])
    times = _random_times(L, 4, seed=0)
    batch = s.generate(prompts, noise, times)
    for i in range(4):
        alone = s.generate(prompts[i : i + 1], noise[i : i + 1], times[i : i + 1])
        assert np.abs(batch[i] - alone[0]).max() <= TOL, (case.family, i)
    # the schedule matters: same prompt and noise, two schedules, two images
    assert np.abs(batch[0] - s.generate(prompts[:1], noise[:1], times[1:2])[0]).max() > 1e-3


def test_sampler_protocol_shapes(case: Case):
    s = case.sampler
    assert isinstance(s, Sampler)
    spec = s.spec()
    assert spec.backend == {"sd15": "sd", "sdxl": "sd"}.get(case.family, case.family)
    assert len(spec.x_shape) == 3 and spec.x_shape[1:] == (SIZE // 2, SIZE // 2)
    x = s.initial_noise([7, 8])
    assert x.shape == (2, *spec.x_shape) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0], s.initial_noise([7])[0])  # a pure function of the seed
    feats = s.encode(PROMPTS)
    for f in feats:
        assert f.tokens.dtype == np.float32 and f.tokens.shape[1] == spec.token_dim
        assert f.pooled is not None and f.pooled.shape == (spec.pooled_dim,)
    # trimmed to the real length: the longer prompt has more tokens, and fewer than the padding
    assert 1 < feats[0].tokens.shape[0] < feats[1].tokens.shape[0] < 77
    images = s.sample(PROMPTS, x, _random_times(3, 2, seed=1))
    assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == np.uint8


def test_bad_schedules_are_refused(case: Case):
    s = case.sampler
    x = s.initial_noise([1])
    for bad in ([[0.5, 0.5]], [[0.3, 0.6]], [[1.2, 0.5]], [[0.5, 0.0]]):
        with pytest.raises(ValueError):
            s.sample(PROMPTS[:1], x, np.array(bad))
    with pytest.raises(ValueError):
        s.sample(PROMPTS[:1], x[:, :1], np.array([[0.5]]))


def test_chunked_batches_equal_whole_batches():
    case = build("sd15", max_batch_size=3)
    s = case.sampler
    noise = s.initial_noise(list(range(5)))
    times = _random_times(2, 5, seed=2)
    prompts = [PROMPTS[i % 2] for i in range(5)]
    whole = build("sd15").sampler.generate(prompts, noise, times)
    assert np.abs(s.generate(prompts, noise, times) - whole).max() <= TOL


def test_prompt_cache_encodes_each_prompt_once():
    s = build("flux", prompt_cache=2).sampler
    calls = []
    encode = s._cache.encode
    s._cache.encode = lambda ps: calls.append(list(ps)) or encode(ps)
    s.encode(["a", "b", "a"])
    s.encode(["b", "a"])
    assert calls == [["a", "b"]]
    s.encode(["c"])  # evicts the least recently used ("b")
    s.encode(["b"])
    assert calls == [["a", "b"], ["c"], ["b"]]


# bfloat16: a pixel in [0, 1] has 2^-8 resolution, and kernels round differently at different batch
# sizes (our batch of N samples vs the stock pipeline's batch of 1); ~8 ulps of slack.
BF16_TOL = 3e-2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_matches_stock_and_batches(family: str, device: str):
    """bfloat16 (the dtype of real runs): our loop against the stock pipeline, and batched against
    one at a time. The CUDA variant carries the gpu marker; the CPU one checks the dtype handling."""
    case = build(family, device=device, dtype="bfloat16")
    s, L = case.sampler, 5
    noise = s.initial_noise([1, 2])
    ours = s.generate(PROMPTS, noise, _default_times(s, L, 2))
    for i, prompt in enumerate(PROMPTS):
        lat = torch.from_numpy(noise[i : i + 1]).to(device, torch.bfloat16)
        assert np.abs(case.stock(prompt, L, latents=lat) - ours[i]).max() <= BF16_TOL, family
    times = _random_times(L, 2, seed=3)
    batch = s.generate(PROMPTS, noise, times)
    for i in range(2):
        alone = s.generate(PROMPTS[i : i + 1], noise[i : i + 1], times[i : i + 1])
        assert np.abs(batch[i] - alone[0]).max() <= BF16_TOL, family


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", ["flux", "sd3", "sd15", "sdxl"])
def test_a_reduced_dtype_step_rounds_as_the_stock_scheduler(family: str, dtype: str):
    """One sample in bfloat16 (the shipped configs' dtype) or float16 is the stock pipeline's to the
    bit. Flow: the Euler step size is taken in the model's dtype, as FlowMatchEulerDiscreteScheduler.step
    takes it (a float32 step size changed 4 in 10 uint8 values). SD: each sample's sigma is a 0-dim
    float32 CPU tensor, as EulerDiscreteScheduler holds it, which the model's dtype rounds as there
    (a float32 product left 2 uint8 levels of difference in bfloat16)."""
    case = build(family, dtype=dtype)
    s = case.sampler
    noise = s.initial_noise([1])
    for L in (1, 5):
        ours = s.generate(PROMPTS[:1], noise, _default_times(s, L, 1))
        stock = case.stock(PROMPTS[0], L, latents=torch.from_numpy(noise).to(getattr(torch, dtype)))
        assert np.abs(stock - ours[0]).max() == 0.0, (family, L)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3"])
def test_a_negative_prompt_is_the_stock_pipelines(family: str):
    """sampler.<family>.negative_prompt on a batch of prompts: SD1.x's encoder refused a string
    beside a list of prompts, so every SD1.5 run with a negative prompt stopped its workers."""
    case = build(family, negative_prompt="blurry")
    s = case.sampler
    noise = s.initial_noise([7, 8])
    ours = s.generate(PROMPTS, noise, _default_times(s, 3, 2))
    for i, prompt in enumerate(PROMPTS):
        stock = case.stock(prompt, 3, latents=torch.from_numpy(noise[i : i + 1]))
        plain = build(family).stock(prompt, 3, latents=torch.from_numpy(noise[i : i + 1]))
        assert np.abs(stock - ours[i]).max() <= TOL < np.abs(plain - ours[i]).max(), (family, i)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_float16_latents_are_decoded_as_each_pipeline_decodes_them(family: str):
    """SDXL's pipeline decodes in float32 (its fp16 VAE overflows, force_upcast); SD1.x's decodes
    in float16, though its VAE's config says force_upcast too: upcasting it changed 143 of 3072
    uint8 values of a tiny SD1.5 sample against its stock image."""
    pipe = tiny_pipeline(family).to(torch.float16)
    cfg = SDConfig(model="tiny", device="cpu", dtype="float16", height=SIZE, width=SIZE)
    from rollout.backends.sd import SDFamily

    s = DiffusersSampler(SDFamily, pipe, cfg)
    lat = (3 * torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))).half()
    vae = pipe.vae
    as_stock = vae.float() if family == "sdxl" else vae
    with torch.no_grad():
        image = as_stock.decode(lat.to(as_stock.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    vae.half()
    ours = s.family._decode(lat)
    assert np.abs(pipe.image_processor.postprocess(image, output_type="np") - ours).max() == 0.0
    assert vae.dtype == torch.float16


def test_sd15_pooled_is_clips_pooled_output():
    case = build("sd15")
    pipe = case.pipe
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = pipe.text_encoder(ids).pooler_output.numpy()
    got = np.stack([f.pooled for f in case.sampler.encode(PROMPTS)])
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_sizes_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="multiples of"):
        build("flux", height=42)  # 2x VAE and 2x2 packing need multiples of 4; FluxPipeline would resize silently
    from common.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="sampler.flux.bogus"):
        load_config([], sampler={"backend": "flux", "flux": {"bogus": 1}})


def test_a_saved_pipeline_loads_in_its_dtype_without_diffusers_deprecation_warnings(tmp_path):
    """diffusers 0.40 takes the dtype as ``dtype``; ``torch_dtype`` still worked but warned
    (a FutureWarning from every rollout worker, on every run)."""
    import warnings

    from diffusers import FluxPipeline

    from rollout.backends.diffusers_common import load_pipeline
    from tests.fixtures.tiny_pipelines import save_tiny

    path = save_tiny("flux", tmp_path / "flux")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_pipeline(FluxPipeline, FluxConfig(model=str(path), dtype="bfloat16", local_files_only=True))
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert not [w for w in caught if "dtype" in str(w.message)], [str(w.message) for w in caught]
