"""The sd3 backend: Stable Diffusion 3 / 3.5 through diffusers' StableDiffusion3Pipeline, every sample
on its own schedule, with classifier-free guidance.

Time map: a rectified flow executes sigma = t, with the scheduler's shift switched off; Euler from
t_k to t_{k+1}, t_{L+1} = 0 (docs/method.md). The stock schedule (the scheduler's own grid
``linspace(sigma_max, sigma_min, L)`` after SD3's static shift 3, or the dynamic shift where the
config asks for it) is ``default_tau``, a point of the simplex with tau_1 = 0.

Policy features: x_T as the image-shaped latent [C, h, w], the T5 token embeddings trimmed to the
prompt's real length (the CLIP tokens where the pipeline has no T5), the pooled CLIP-L/G embedding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import get_module_execution_device

from common.config import SD3Config
from common.schedule import resolution_mu, tau_from_times
from rollout.backends.diffusers_common import (
    FLOW_TIME,
    DiffusersSampler,
    check_flow_scheduler,
    image_size,
    stack,
)


def sd3_sampler(cfg: SD3Config) -> DiffusersSampler:
    """The sd3 backend's sampler, its pipeline loaded from ``cfg``."""
    from diffusers import StableDiffusion3Pipeline

    return DiffusersSampler.from_pretrained(SD3Family, StableDiffusion3Pipeline, cfg)


class SD3Family:
    """SD3's encoders, time map and loop (``DiffusersFamily``)."""

    backend = "sd3"
    time_convention = FLOW_TIME

    def __init__(self, pipe, cfg: SD3Config):
        """``pipe``: a StableDiffusion3Pipeline, prepared (devices, dtype) by ``DiffusersSampler``."""
        self.pipe, self.cfg = pipe, cfg
        check_flow_scheduler(pipe, "sd3")
        vsf = pipe.vae_scale_factor
        default = pipe.default_sample_size * vsf
        self.height, self.width = image_size(cfg, default, default, vsf * pipe.transformer.config.patch_size, "sd3")
        self.x_shape = (pipe.transformer.config.in_channels, self.height // vsf, self.width // vsf)
        self.cfg_guidance = cfg.guidance_scale > 1  # StableDiffusion3Pipeline.do_classifier_free_guidance
        self.token_dim = pipe.transformer.config.joint_attention_dim
        self.pooled_dim = pipe.transformer.config.pooled_projection_dim

    def call_kwargs(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "guidance_scale": c.guidance_scale,
            "negative_prompt": c.negative_prompt,
            "max_sequence_length": c.max_sequence_length,
        }

    def reads(self) -> dict[str, Any]:
        """Whose text tokens the policy reads: T5's, or CLIP's where the pipeline has no T5 encoder
        (loaded with text_encoder_3=None)."""
        return {"text_tokens": "t5" if self.pipe.text_encoder_3 is not None else "clip"}

    def default_tau(self, steps: int) -> np.ndarray:
        """The stock schedule, read from a fresh copy of the pipeline's scheduler called as
        StableDiffusion3Pipeline.__call__ calls it (no sigmas; mu only with dynamic shifting)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        kwargs = {"mu": self._mu()} if sched.config.get("use_dynamic_shifting", None) else {}
        sched.set_timesteps(steps, **kwargs)
        return tau_from_times(sched.sigmas[:-1].double().numpy())

    def _mu(self) -> float:
        """StableDiffusion3Pipeline's resolution-dependent shift (passed only with dynamic shifting)."""
        patch = self.pipe.transformer.config.patch_size
        seq_len = (self.x_shape[1] // patch) * (self.x_shape[2] // patch)
        c = self.pipe.scheduler.config
        return resolution_mu(
            seq_len,
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", 1.16),  # the SD3 pipeline's fallback differs from Flux's 1.15
        )

    # --- the loop ------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, conds: list[dict], noise: np.ndarray, times: np.ndarray) -> np.ndarray:
        # Mirrors diffusers 0.42.1 StableDiffusion3Pipeline.__call__ (steps 4-7 and the decode; no
        # skip-layer guidance, no IP adapter), with one change: a per-sample sigma vector instead of
        # the scheduler's scalar step index, FlowMatchEulerDiscreteScheduler.step inlined.
        pipe = self.pipe
        device = pipe._execution_device
        embeds, pooled = stack(conds, "embeds"), stack(conds, "pooled")
        if self.cfg_guidance:
            embeds = torch.cat([stack(conds, "neg_embeds"), embeds])
            pooled = torch.cat([stack(conds, "neg_pooled"), pooled])
        latents = torch.from_numpy(noise).to(device=device, dtype=embeds.dtype)
        sig = torch.from_numpy(times.astype(np.float32)).to(device)
        sig_next = torch.cat([sig[:, 1:], torch.zeros_like(sig[:, :1])], dim=1)
        n_train = pipe.scheduler.config.num_train_timesteps
        for k in range(sig.shape[1]):
            x_in = torch.cat([latents] * 2) if self.cfg_guidance else latents
            timestep = sig[:, k] * n_train  # the scheduler's timesteps are sigma * num_train_timesteps
            if self.cfg_guidance:
                timestep = torch.cat([timestep] * 2)
            v = pipe.transformer(
                hidden_states=x_in,
                timestep=timestep,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
            if self.cfg_guidance:
                v_uncond, v_text = v.chunk(2)
                v = v_uncond + self.cfg.guidance_scale * (v_text - v_uncond)
            # Euler as the scheduler's step: the step size in the model's dtype times its output,
            # added to the latents in float32, then cast back (in bfloat16 a float32 step size
            # changed 4 in 10 of the pixels' uint8 values)
            dt = (sig_next[:, k] - sig[:, k]).view(-1, 1, 1, 1)
            latents = (latents.float() + dt.to(v.dtype) * v).to(v.dtype)
        latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents.to(get_module_execution_device(pipe.vae)), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="np")

    # --- helpers ---------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_batch(self, prompts: list[str]) -> list[dict]:
        pipe, msl = self.pipe, self.cfg.max_sequence_length
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=pipe._execution_device,
            do_classifier_free_guidance=self.cfg_guidance,
            negative_prompt=self.cfg.negative_prompt,
            max_sequence_length=msl,
        )
        # prompt_embeds = [CLIP tokens (padded to tokenizer_max_length) ; T5 tokens (max_sequence_length)]
        n_clip = pipe.tokenizer_max_length
        if pipe.text_encoder_3 is not None:
            mask = pipe.tokenizer_3(prompts, padding="max_length", max_length=msl, truncation=True).attention_mask
            spans = [(n_clip, max(1, int(sum(m)))) for m in mask]
        else:
            mask = pipe.tokenizer(prompts, padding="max_length", max_length=n_clip, truncation=True).attention_mask
            spans = [(0, max(1, int(sum(m)))) for m in mask]
        out = []
        for i in range(len(prompts)):
            item = {"embeds": embeds[i], "pooled": pooled[i], "span": spans[i]}
            if self.cfg_guidance:
                item.update(neg_embeds=neg[i], neg_pooled=neg_pooled[i])
            out.append(item)
        return out
