"""The sd backend: Stable Diffusion 1.x and SDXL (epsilon UNets) through diffusers'
StableDiffusionPipeline / StableDiffusionXLPipeline, every sample on its own schedule, Euler, CFG.

Time map (docs/method.md and docs/backends.md; ``common.schedule.epsilon_timesteps``): t in [0, 1] is the
continuous training timestep t*T - 1 (t = 1: timestep T-1; t = 1/T: timestep 0; t = 0: the clean
sample, sigma = 0); its noise level sigma is interpolated in the training schedule. The model is
evaluated at t_1..t_L and Euler steps in sigma from t_k to t_{k+1} (EulerDiscreteScheduler's update
with s_churn = 0). x_T is scaled to the state at t_1 by the scheduler's own rule for the initial
noise (``init_noise_sigma`` at sigma(t_1)). The default schedule is the stock EulerDiscreteScheduler
grid built from the model's scheduler config (``EulerDiscreteScheduler.from_config(pipe.scheduler.
config)``, as a user swaps it in): SD1.5's PNDM config gives 'linspace' timesteps 999, 749.25, ...,
0 at L = 5 (tau_1 = 0); SDXL's gives 'leading' 801, ..., 1 (tau_1 > 0: the start is skipped).

Policy features: x_T as the image-shaped latent [4, h, w]; the CLIP token embeddings the UNet
cross-attends to (SDXL: CLIP-L and CLIP-G concatenated) trimmed to the prompt's real length; the
pooled embedding (SD1.5: CLIP's pooled output, the end-of-text token; SDXL: CLIP-G's projection).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import get_module_execution_device

from common.config import SDConfig
from common.schedule import ays_tau, epsilon_model_timesteps, epsilon_sigmas, epsilon_tau
from rollout.backends.diffusers_common import EPSILON_TIME, DiffusersSampler, fetched_pipeline, image_size, stack


def sd_sampler(cfg: SDConfig) -> DiffusersSampler:
    """The sd backend's sampler: the family (SD1.x/2.x or SDXL) is read from model_index.json."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    with fetched_pipeline(cfg):
        index = DiffusionPipeline.load_config(cfg.model, revision=cfg.revision, local_files_only=cfg.local_files_only)
    name = index.get("_class_name")
    if name == "StableDiffusionXLPipeline":
        return DiffusersSampler.from_pretrained(SDFamily, StableDiffusionXLPipeline, cfg, add_watermarker=False)
    if name == "StableDiffusionPipeline":
        return DiffusersSampler.from_pretrained(
            SDFamily, StableDiffusionPipeline, cfg, safety_checker=None, requires_safety_checker=False
        )
    raise ValueError(
        f"{cfg.model} is a {name}; the sd backend runs StableDiffusionPipeline or StableDiffusionXLPipeline"
    )


#: The scheduler settings an SD policy's times become images under (``SDFamily.reads``).
SCHEDULE_SETTINGS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
    "timestep_spacing",
    "prediction_type",
)


def euler_step(
    out: torch.Tensor, latents: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, v_pred: bool
) -> torch.Tensor:
    """One sample's ``EulerDiscreteScheduler.step`` (s_churn = 0): x0 from the prediction, the ODE
    derivative, Euler to ``sigma_next``; the sigmas 0-dim float32 CPU tensors, as the scheduler
    holds them, so the model's dtype rounds them as it does there."""
    x = latents.to(torch.float32)
    if v_pred:
        x0 = out * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
    else:
        x0 = x - sigma * out
    return (x + (x - x0) / sigma * (sigma_next - sigma)).to(out.dtype)


class SDFamily:
    """SD1.x/2.x and SDXL: their encoders, time map and Euler loop with CFG (``DiffusersFamily``)."""

    backend = "sd"
    time_convention = EPSILON_TIME

    def __init__(self, pipe, cfg: SDConfig):
        """``pipe``: a StableDiffusionPipeline or StableDiffusionXLPipeline, prepared by ``DiffusersSampler``."""
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        self.pipe, self.cfg = pipe, cfg
        self.xl = isinstance(pipe, StableDiffusionXLPipeline)
        # Euler on the model's own betas, whatever scheduler it ships (SD1.5 ships PNDM)
        self.euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        ec = self.euler.config
        if ec.prediction_type not in ("epsilon", "v_prediction") or ec.get("timestep_type", "discrete") != "discrete":
            raise ValueError(
                f"the sd backend runs epsilon or v-prediction UNets, not {ec.prediction_type!r} / {ec.timestep_type!r}"
            )
        if pipe.unet.config.time_cond_proj_dim is not None:
            raise ValueError("guidance-distilled UNets (time_cond_proj_dim) are not supported")
        alphas_cumprod = self.euler.alphas_cumprod
        # the training noise levels, as EulerDiscreteScheduler.set_timesteps computes them (float32)
        self.train_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()
        vsf = pipe.vae_scale_factor
        size = pipe.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        self.height, self.width = image_size(cfg, h * vsf, w * vsf, vsf, "sd")
        self.x_shape = (pipe.unet.config.in_channels, self.height // vsf, self.width // vsf)
        self.cfg_guidance = cfg.guidance_scale > 1  # the pipelines' do_classifier_free_guidance
        self.token_dim = pipe.unet.config.cross_attention_dim
        if self.xl:
            self.pooled_dim = pipe.text_encoder_2.config.projection_dim
        else:
            self.pooled_dim = pipe.text_encoder.config.hidden_size

    def ays_tau(self, steps: int) -> np.ndarray:
        """Align Your Steps (diffusers' ``AysSchedules`` for SD1.5 or SDXL) at ``steps`` NFE."""
        from diffusers.schedulers import AysSchedules

        key = "StableDiffusionXLSigmas" if self.xl else "StableDiffusionSigmas"
        return ays_tau(np.asarray(AysSchedules[key]), steps, self.train_sigmas)

    def call_kwargs(self) -> dict[str, Any]:
        return {"guidance_scale": self.cfg.guidance_scale, "negative_prompt": self.cfg.negative_prompt}

    def reads(self) -> dict[str, Any]:
        """The scheduler settings of the time map and the initial noise: the betas (sigma of a
        timestep), the spacing (its rule for the initial noise's scale) and what the model predicts;
        of the pipeline's scheduler as it is now (the export's pipeline may have had it swapped)."""
        from diffusers import EulerDiscreteScheduler

        c = EulerDiscreteScheduler.from_config(self.pipe.scheduler.config).config
        return {k: c.get(k) for k in SCHEDULE_SETTINGS}

    def default_tau(self, steps: int) -> np.ndarray:
        """The stock EulerDiscreteScheduler grid at ``steps`` (from the model's scheduler config)."""
        from diffusers import EulerDiscreteScheduler

        sched = EulerDiscreteScheduler.from_config(self.euler.config)
        sched.set_timesteps(steps)
        if (
            sched.config.interpolation_type != "linear"
            or sched.config.final_sigmas_type != "zero"
            or any(sched.config.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"))
        ):
            # those grids are not sigma(timestep) of the linear map executed here
            raise ValueError("the sd backend reproduces linear-interpolated Euler grids ending in 0 only")
        return epsilon_tau(sched.timesteps.double().numpy(), sched.config.num_train_timesteps)

    # --- the loop ------------------------------------------------------------------------------

    def sigmas(self, times: np.ndarray) -> np.ndarray:
        """[N, L] times -> [N, L+1] float32 noise levels: sigma(t_1..t_L), then 0."""
        t = np.concatenate([times, np.zeros_like(times[:, :1])], axis=1)
        return epsilon_sigmas(t, self.train_sigmas).astype(np.float32)

    @torch.no_grad()
    def run(self, conds: list[dict], noise: np.ndarray, times: np.ndarray) -> np.ndarray:
        # Mirrors diffusers 0.42.1 StableDiffusionPipeline.__call__ / StableDiffusionXLPipeline.__call__
        # with EulerDiscreteScheduler (denoising loop and decode; no IP adapter, no guidance rescale,
        # no watermark), with one change: each sample its own sigma and timestep instead of the
        # scheduler's step index; scale_model_input and step (s_churn = 0) inlined, per sample.
        pipe, cfg_g = self.pipe, self.cfg_guidance
        device = pipe._execution_device
        embeds = stack(conds, "embeds")
        extra = {}
        if cfg_g:
            embeds = torch.cat([stack(conds, "neg_embeds"), embeds])
        if self.xl:
            text_embeds = stack(conds, "pooled")
            time_ids = pipe._get_add_time_ids(
                (self.height, self.width),
                (0, 0),
                (self.height, self.width),
                dtype=embeds.dtype,
                text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
            ).to(device)
            if cfg_g:
                text_embeds = torch.cat([stack(conds, "neg_pooled"), text_embeds])
            extra["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids.repeat(len(embeds), 1)}
        # [n, L+1] float32 on the CPU, where EulerDiscreteScheduler keeps its sigmas: each sample's arithmetic
        # below is the scheduler's with its own sigma as the same 0-dim CPU tensor, so a reduced dtype rounds
        # as stock does on any device (a CPU scalar's kernel path, not a broadcast vector's)
        sig = torch.from_numpy(self.sigmas(times))
        n_train = self.euler.config.num_train_timesteps
        timesteps = torch.from_numpy(epsilon_model_timesteps(times, n_train).astype(np.float32)).to(device)
        # the initial noise is scaled as EulerDiscreteScheduler.init_noise_sigma scales it, at sigma(t_1)
        if self.euler.config.timestep_spacing in ("linspace", "trailing"):
            init = sig[:, 0]
        else:
            init = (sig[:, 0] ** 2 + 1) ** 0.5
        latents = torch.from_numpy(noise).to(device=device, dtype=embeds.dtype)
        latents = torch.stack([x * i for x, i in zip(latents, init, strict=True)])
        v_pred = self.euler.config.prediction_type == "v_prediction"
        for k in range(times.shape[1]):
            x_in = torch.stack([x / ((s**2 + 1) ** 0.5) for x, s in zip(latents, sig[:, k], strict=True)])
            x_in = torch.cat([x_in] * 2) if cfg_g else x_in  # scale_model_input
            t_in = torch.cat([timesteps[:, k]] * 2) if cfg_g else timesteps[:, k]
            out = pipe.unet(x_in, t_in, encoder_hidden_states=embeds, return_dict=False, **extra)[0]
            if cfg_g:
                out_uncond, out_text = out.chunk(2)
                out = out_uncond + self.cfg.guidance_scale * (out_text - out_uncond)
            latents = torch.stack(
                [
                    euler_step(o, x, s, n, v_pred)
                    for o, x, s, n in zip(out, latents, sig[:, k], sig[:, k + 1], strict=True)
                ]
            )
        return self._decode(latents)

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        pipe, vae = self.pipe, self.pipe.vae
        # SDXL's fp16 VAE overflows, and its pipeline decodes in float32; SD1.x's decodes in fp16
        upcast = self.xl and vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
            latents = latents.to(torch.float32)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if self.xl and mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents.to(get_module_execution_device(vae)), return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        return pipe.image_processor.postprocess(image, output_type="np")

    # --- helpers ---------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_batch(self, prompts: list[str]) -> list[dict]:
        pipe, device, cfg_g = self.pipe, self.pipe._execution_device, self.cfg_guidance
        if self.xl:
            embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompt=prompts,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=cfg_g,
                negative_prompt=self.cfg.negative_prompt,
            )
            tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
        else:
            # SD1.x's encode_prompt takes a negative prompt of the prompt's type: one per prompt
            negative = None if self.cfg.negative_prompt is None else [self.cfg.negative_prompt] * len(prompts)
            embeds, neg = pipe.encode_prompt(prompts, device, 1, cfg_g, negative)
            neg_pooled = None
            tokenizers = [pipe.tokenizer]
        # real length of each prompt in CLIP tokens (with start and end of text)
        masks = [
            tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True).attention_mask
            for tok in tokenizers
            if tok is not None
        ]
        lengths = np.max([np.sum(m, axis=1) for m in masks], axis=0)
        out = []
        for i, length in enumerate(lengths):
            length = max(1, int(length))
            # SD1.5 has no pooled conditioning: CLIP's pooled output is its end-of-text token
            p = pooled[i] if self.xl else embeds[i, length - 1]
            item = {"embeds": embeds[i], "pooled": p, "span": (0, length)}
            if cfg_g:
                item["neg_embeds"] = neg[i]
                if self.xl:
                    item["neg_pooled"] = neg_pooled[i]
            out.append(item)
        return out
