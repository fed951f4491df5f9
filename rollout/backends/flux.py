"""The flux backend: Flux (Dev, Schnell) through diffusers' FluxPipeline, every sample on its own schedule.

Time map: a rectified flow executes sigma = t, with the scheduler's shift switched off (it re-shifts
custom sigmas); Euler from t_k to t_{k+1}, t_{L+1} = 0 (docs/method.md). The stock schedule,
``linspace(1, 1/L, L)`` after Flux's resolution-dependent shift (``mu`` from the number of latent
tokens), is ``default_tau``: a point of the simplex with tau_1 = 0.

Policy features: x_T unpacked to an image-shaped latent [C, h, w] (packed into 2x2 patches inside
the sampler), the T5 token embeddings trimmed to the prompt's real length, CLIP's pooled embedding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import get_module_execution_device

from common.config import FluxConfig
from common.schedule import resolution_mu, tau_from_times
from rollout.backends.diffusers_common import (
    FLOW_TIME,
    DiffusersSampler,
    check_flow_scheduler,
    image_size,
    stack,
)


def flux_sampler(cfg: FluxConfig) -> DiffusersSampler:
    """The flux backend's sampler, its pipeline loaded from ``cfg``."""
    from diffusers import FluxPipeline

    return DiffusersSampler.from_pretrained(FluxFamily, FluxPipeline, cfg)


class FluxFamily:
    """Flux's encoders, time map and loop (``DiffusersFamily``)."""

    backend = "flux"
    time_convention = FLOW_TIME

    def __init__(self, pipe, cfg: FluxConfig):
        """``pipe``: a diffusers FluxPipeline, prepared (devices, dtype) by ``DiffusersSampler``."""
        self.pipe, self.cfg = pipe, cfg
        check_flow_scheduler(pipe, "flux")
        vsf = pipe.vae_scale_factor
        default = pipe.default_sample_size * vsf
        self.height, self.width = image_size(cfg, default, default, 2 * vsf, "flux")
        h, w = 2 * (self.height // (2 * vsf)), 2 * (self.width // (2 * vsf))
        self.x_shape = (pipe.transformer.config.in_channels // 4, h, w)
        self.token_dim = pipe.text_encoder_2.config.d_model
        self.pooled_dim = pipe.text_encoder.config.hidden_size

    def call_kwargs(self) -> dict[str, Any]:
        return {"guidance_scale": self.cfg.guidance_scale, "max_sequence_length": self.cfg.max_sequence_length}

    def reads(self) -> dict[str, Any]:
        """Nothing beyond the class and the size: the export undoes any shift of the scheduler."""
        return {}

    def default_tau(self, steps: int) -> np.ndarray:
        """The stock schedule, read from a fresh copy of the pipeline's scheduler given exactly what
        FluxPipeline.__call__ gives it (sigmas = linspace(1, 1/L, L) and mu)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=self._mu())
        return tau_from_times(sched.sigmas[:-1].double().numpy())

    # --- the loop ------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, conds: list[dict], noise: np.ndarray, times: np.ndarray) -> np.ndarray:
        # Mirrors diffusers 0.42.1 FluxPipeline.__call__ (steps 4-6 and the decode), with one change:
        # a per-sample sigma vector instead of the scheduler's scalar step index, and
        # FlowMatchEulerDiscreteScheduler.step inlined as a per-sample Euler step.
        from diffusers import FluxPipeline

        pipe, n = self.pipe, len(conds)
        device = pipe._execution_device
        embeds, pooled = stack(conds, "embeds"), stack(conds, "pooled")
        te_dtype = pipe.text_encoder.dtype if pipe.text_encoder is not None else pipe.transformer.dtype
        text_ids = torch.zeros(embeds.shape[1], 3).to(device=device, dtype=te_dtype)
        c, h, w = self.x_shape
        latents = torch.from_numpy(noise).to(device=device, dtype=embeds.dtype)
        latents = FluxPipeline._pack_latents(latents, n, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, device, embeds.dtype)
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.full([n], self.cfg.guidance_scale, device=device, dtype=torch.float32)
        # sigma = t, in float32 as the scheduler holds it; the last step goes to 0
        sig = torch.from_numpy(times.astype(np.float32)).to(device)
        sig_next = torch.cat([sig[:, 1:], torch.zeros_like(sig[:, :1])], dim=1)
        for k in range(sig.shape[1]):
            timestep = (sig[:, k] * 1000).to(latents.dtype)  # the scheduler's timesteps are sigma * 1000
            v = pipe.transformer(
                hidden_states=latents,
                timestep=timestep / 1000,
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=text_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
            # Euler as the scheduler's step: the step size in the model's dtype times its output,
            # added to the latents in float32, then cast back (in bfloat16 a float32 step size
            # changed 4 in 10 of the pixels' uint8 values)
            dt = (sig_next[:, k] - sig[:, k]).view(-1, 1, 1)
            latents = (latents.float() + dt.to(v.dtype) * v).to(v.dtype)
        latents = FluxPipeline._unpack_latents(latents, self.height, self.width, pipe.vae_scale_factor)
        latents = (latents / pipe.vae.config.scaling_factor) + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents.to(get_module_execution_device(pipe.vae)), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="np")

    # --- helpers ---------------------------------------------------------------------------------

    def _mu(self) -> float:
        """FluxPipeline's resolution-dependent shift for this image size (always passed, even when
        the scheduler does not use it)."""
        cfg = self.pipe.scheduler.config
        seq_len = (self.x_shape[1] // 2) * (self.x_shape[2] // 2)
        return resolution_mu(
            seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )

    @torch.no_grad()
    def encode_batch(self, prompts: list[str]) -> list[dict]:
        pipe, msl = self.pipe, self.cfg.max_sequence_length
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=pipe._execution_device, max_sequence_length=msl
        )
        # the T5 tokens the prompt really has (with </s>), as the pipeline's own tokenizer counts them
        mask = pipe.tokenizer_2(prompts, padding="max_length", max_length=msl, truncation=True).attention_mask
        return [
            {"embeds": embeds[i], "pooled": pooled[i], "span": (0, max(1, int(sum(mask[i]))))}
            for i in range(len(prompts))
        ]
