"""The stock diffusers pipelines run one sample on a given schedule: the reference our per-sample
loops are tested and benchmarked against.

How each stock pipeline is made to execute a schedule exactly as our time maps define it (the
diffusers traps of DESIGN.md section 4):

- Flux, SD3: custom ``sigmas`` = the times, with a scheduler copy whose shift is switched off
  (``shift=1``, no dynamic shifting), since FlowMatchEulerDiscreteScheduler re-shifts custom sigmas
  (and FluxPipeline always passes ``mu``).
- SD1.5, SDXL: EulerDiscreteScheduler with custom ``timesteps`` = ``t*T - 1``: it interpolates
  sigma linearly in the training schedule, appends the final 0, and scales the given latents by
  ``init_noise_sigma`` at the first sigma (custom ``sigmas`` would be mapped back to timesteps by a
  log-sigma interpolation, which differs slightly).
"""

from __future__ import annotations

import numpy as np
import torch

from common.schedule import epsilon_timesteps


def stock_pipeline_for_schedules(pipe):
    """A shallow copy of ``pipe`` whose scheduler executes given schedules unmodified."""
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    sched = pipe.scheduler
    if isinstance(sched, FlowMatchEulerDiscreteScheduler):
        new = FlowMatchEulerDiscreteScheduler.from_config(sched.config, shift=1.0, use_dynamic_shifting=False)
    else:
        new = EulerDiscreteScheduler.from_config(sched.config)
    stock = type(pipe)(**{**pipe.components, "scheduler": new})
    stock.set_progress_bar_config(disable=True)
    return stock


def stock_generate(pipe, prompt: str, noise: np.ndarray, times: np.ndarray, height: int, width: int, **kwargs) -> np.ndarray:
    """One float image [H, W, 3] from the stock pipeline (made by ``stock_pipeline_for_schedules``)
    for ``prompt`` from ``noise`` [C, h, w] on the schedule ``times`` [L]."""
    from diffusers import FluxPipeline

    dtype = (getattr(pipe, "transformer", None) or pipe.unet).dtype
    device = pipe._execution_device
    latents = torch.from_numpy(noise[None]).to(device, dtype)
    call = dict(kwargs, height=height, width=width, output_type="np")
    if isinstance(pipe, FluxPipeline):
        call["latents"] = FluxPipeline._pack_latents(latents, 1, *latents.shape[1:])
        call["sigmas"] = [float(t) for t in np.float32(times)]
    elif hasattr(pipe, "transformer"):  # SD3
        call["latents"] = latents
        call["sigmas"] = [float(t) for t in np.float32(times)]
    else:
        call["latents"] = latents
        call["timesteps"] = [float(t) for t in epsilon_timesteps(times, pipe.scheduler.config.num_train_timesteps)]
    return pipe(prompt, **call).images[0]
