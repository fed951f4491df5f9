"""Take a learned schedule home: keyword arguments for a stock diffusers pipeline's own ``__call__``.

    from diffusers import FluxPipeline
    from common.policy import SchedulePolicy
    from rollout.export import PipelineSchedule

    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", dtype=torch.bfloat16).to("cuda")
    policy = SchedulePolicy.from_pretrained("runs/flux/policy")
    schedule = PipelineSchedule(policy, pipe)
    image = pipe(prompt, **schedule(prompt, seed=0)).images[0]     # the learned schedule, per instance

``schedule(prompt, seed)`` draws the initial noise of ``seed`` as the backend does (or takes a
``torch.Generator``), reads the policy's Dirichlet mean for that (prompt, noise), and returns
``latents=`` with ``sigmas=`` (Flux, SD3) or ``timesteps=`` (SD1.5, SDXL with an Euler scheduler),
with ``num_inference_steps``, ``height`` and ``width``. ``schedule.global_schedule()`` is a global
policy's one schedule as a plain list in the same form, for use with no extra model, as diffusers'
``AysSchedules`` are.

The double-shift trap (docs/backends.md): a flow scheduler (FlowMatchEulerDiscreteScheduler)
shifts the sigmas it is given, statically (SD3: 3.0) or by the image size (Flux's ``mu``). The
policy's times are the sigmas the model must see, so the sigmas returned here are pre-images under
the pipeline's own shift: after the scheduler shifts them, the model runs exactly the learned
schedule, with the pipeline and its scheduler left as they are.

The policy records its backbone, pipeline class, L and time convention (``SchedulePolicy``'s saved
config); a pipeline of another class is refused with a message naming both.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import MAX_SEED
from common.policy import SchedulePolicy, dirichlet_mean
from common.prompts import check_prompts
from common.schedule import epsilon_model_timesteps, times_from_tau
from rollout.sampler import policy_inputs

#: pipeline class -> the backend that trains for it
PIPELINES = {
    "FluxPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sd",
}


def _sampler_for(pipe: Any, height: int | None, width: int | None, call: dict[str, Any]):
    """Our sampler around the user's pipeline: the same encoders, noise shapes and time maps the
    policy was trained with, and ``call``'s settings (the guidance, the T5 length) where the
    backend has them. The pipeline is left as it is: its device, offload, modes, progress bars."""
    from common.config import FluxConfig, SD3Config, SDConfig
    from rollout.backends.diffusers_common import DiffusersSampler

    name = type(pipe).__name__
    common: dict[str, Any] = {
        "model": name,
        "device": str(pipe._execution_device),
        "height": height,
        "width": width,
        "max_batch_size": 1,
        # the encoder outputs of the last prompt only (the pipeline encodes each call's again): the
        # several seeds of one prompt encode it once, and no more is held on the device (with T5,
        # megabytes per prompt: the default cache of 256 prompts held a GiB)
        "prompt_cache": 1,
    }
    if name == "FluxPipeline":
        from rollout.backends.flux import FluxFamily

        return DiffusersSampler(FluxFamily, pipe, _settings(FluxConfig, common, call), prepare=False)
    if name == "StableDiffusion3Pipeline":
        from rollout.backends.sd3 import SD3Family

        return DiffusersSampler(SD3Family, pipe, _settings(SD3Config, common, call), prepare=False)
    from rollout.backends.sd import SDFamily

    return DiffusersSampler(SDFamily, pipe, _settings(SDConfig, common, call), prepare=False)


def _settings(section: Any, common: dict[str, Any], call: dict[str, Any]) -> Any:
    """The backend's config section for these arguments; a value out of its range is a ValueError
    of one line naming the argument (0 is a length given, not the default)."""
    from pydantic import ValidationError

    from common.config import format_validation_error

    extra = {k: v for k, v in call.items() if k in section.model_fields and v is not None}
    try:
        return section(**common, **extra)
    except ValidationError as e:  # the config's own wording, its lines after the heading in one
        said = format_validation_error(e).removeprefix("invalid config:")
        why = "; ".join(line.strip() for line in said.splitlines() if line.strip())
        raise ValueError(f"PipelineSchedule: {why}") from None


def _saved_policy(where: str) -> SchedulePolicy:
    """The policy saved in the directory ``where``, or on the hub under the id ``where``; a
    ValueError or OSError in one line naming ``where`` when it cannot be read."""
    from common.checkpoint import read_policy
    from common.hub import fetched

    path = Path(where).expanduser()
    if path.is_dir():
        return read_policy(path)  # a missing config.json, a damaged file: named
    if path.exists():
        raise ValueError(f"policy {where!r} is a file; give the directory of a saved policy (<run>/policy)")
    parts = where.split("/")
    if path.is_absolute() or where.startswith((".", "~")) or len(parts) > 2 or "\\" in where:
        raise ValueError(f"policy {where!r}: no such directory; give the directory of a saved policy (<run>/policy)")
    instead = "give the directory of a saved policy (<run>/policy)"
    with fetched(f"policy {where!r}", instead):
        import huggingface_hub
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:  # first: a repo without it would be built as a policy of no arguments (a TypeError)
            huggingface_hub.hf_hub_download(where, "config.json")
        except LocalEntryNotFoundError:
            raise  # the hub out of reach, or downloads off: ``fetched`` says which
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
            why = "no such repo (or a private one)" if isinstance(e, RepositoryNotFoundError) else "no config.json"
            raise ValueError(f"policy {where!r}: no such directory, and on the hub {why}; {instead}") from None
        return SchedulePolicy.from_pretrained(where).eval()


class PipelineSchedule:
    """A trained ``SchedulePolicy`` bound to a stock diffusers pipeline of the class it was trained for.

    ``policy``: the policy, or where it was saved (``<run>/policy``, a checkpoint's ``policy``, a
    hub id), loaded with ``SchedulePolicy.from_pretrained``; a directory that is not there or
    cannot be read, or a hub out of reach, is one line naming it.

    ``height``/``width``: the image size (default: the pipeline's, as the backend used in
    training); it fixes the noise shape the policy reads and, for Flux, the scheduler's shift. A
    size whose noise is not the shape the policy was trained on is a warning.
    ``max_sequence_length``: the T5 length of Flux and SD3 (default: the training's).

    The returned arguments include the pipeline settings the policy's training images were made
    under (``guidance_scale``; SD and SD3: ``negative_prompt``; Flux and SD3:
    ``max_sequence_length``), as its saved config records them, since the pipeline's own defaults
    may differ (SD3's guidance is 7.0 there, 3.5 in training). To sample otherwise, override them:
    ``pipe(prompt, **{**schedule(prompt, seed=0), "guidance_scale": 5.0})``.
    """

    def __init__(
        self,
        policy: SchedulePolicy | str | os.PathLike,
        pipe: Any,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int | None = None,
    ):
        if isinstance(policy, str | os.PathLike):  # a saved policy: a local directory or a hub id
            policy = _saved_policy(os.fspath(policy))
        if not isinstance(policy, SchedulePolicy):
            raise TypeError(
                f"policy must be a SchedulePolicy or the path of a saved one, got a {type(policy).__name__}"
            )
        name = type(pipe).__name__
        if name not in PIPELINES:
            raise ValueError(f"rollout.export runs {sorted(PIPELINES)}; got a {name}")
        trained = getattr(policy, "pipeline", None)
        if trained is None:
            raise ValueError(
                f"this policy does not record the pipeline it was trained for (backbone {policy.backbone!r});"
                " only a policy trained on a diffusers backend exports to a stock pipeline"
            )
        if trained != name:
            raise ValueError(f"this policy was trained for a {trained} (backbone {policy.backbone!r}), not a {name}")
        self.policy, self.pipe = policy.eval(), pipe
        trained = dict(getattr(policy, "call_kwargs", None) or {})  # {} where a policy saved before them
        given = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        self.sampler = _sampler_for(pipe, height, width, {**trained, **given})
        trained_on = getattr(policy, "x_shape", None)
        made = list(self.sampler.x_shape)
        if trained_on is not None and (len(made), made[0]) != (len(trained_on), trained_on[0]):
            raise ValueError(
                f"this policy read noise of shape {list(trained_on)} in training; this pipeline's"
                f" {'transformer' if hasattr(pipe, 'transformer') else 'unet'} makes noise of shape {made}: another"
                " number of latent channels, which the policy cannot read (a pipeline of another model?)"
            )
        if trained_on is not None and made != list(trained_on):
            warnings.warn(
                f"this policy read noise of shape {list(trained_on)} in training; at this height and width the"
                f" pipeline makes {made}: its schedules would come from an input it never saw"
                " (give the height and width it was trained at)",
                UserWarning,
                stacklevel=2,
            )
        self.family = self.sampler.family
        takes = self.family.call_kwargs()
        given = {k: v for k, v in given.items() if k in takes}  # an SD pipeline takes no T5 length
        self._check_text_widths()
        self.steps = policy.steps
        # what the training images were made under, in the pipeline's own names
        self.call_kwargs = {**takes, **given} if trained else given
        self._check_scheduler()
        self._check_reads()

    def _check_reads(self) -> None:
        """The pipeline's settings the policy's inputs and its times' images are made of, as in
        training (``DiffusersFamily.reads``): SD's scheduler betas and initial-noise rule, SD3's T5
        tokens. Otherwise the same schedule is another image than in training, without a word
        (SDXL with timestep_spacing='trailing' scaled its initial noise by sigma, not sqrt(sigma^2 + 1);
        SD3 loaded with text_encoder_3=None gave the policy CLIP tokens for T5 ones)."""
        trained = getattr(self.policy, "reads", None)
        if not trained:  # saved before they were recorded
            return
        now = self.family.reads()
        differ = {k: (v, now.get(k)) for k, v in trained.items() if now.get(k) != v}
        if not differ:
            return
        if "text_tokens" in differ:
            was, has = differ.pop("text_tokens")
            encoder = "no text_encoder_3" if has == "clip" else "a text_encoder_3"
            raise ValueError(
                f"this policy read the {str(was).upper()} text tokens in training; this pipeline has {encoder}, whose"
                f" {str(has).upper()} tokens the policy never read: load the pipeline with its text encoders as in"
                " training"
            )
        if "prediction_type" in differ:  # a v-prediction fine-tune of the same architecture: another model
            was, has = differ.pop("prediction_type")
            raise ValueError(
                f"this policy was trained on a model predicting {was!r}; this pipeline's scheduler says {has!r}:"
                " another model, whose images at the policy's times are not the ones it learned (if the scheduler's"
                f" config is what is wrong: set pipe.scheduler = {type(self.pipe.scheduler).__name__}.from_config("
                f"pipe.scheduler.config, prediction_type={was!r}))"
            )
        wanted = ", ".join(f"{k}={v!r}" for k, (v, _) in differ.items())
        has = ", ".join(f"{k}={n!r}" for k, (_, n) in differ.items())
        raise ValueError(
            f"this policy was trained with the scheduler's {wanted}; this pipeline's has {has}, under which its"
            f" times are another image: set pipe.scheduler = {type(self.pipe.scheduler).__name__}.from_config("
            f"pipe.scheduler.config, {wanted})"
        )

    def _check_text_widths(self) -> None:
        """The policy reads the text encoders' outputs: another width is another model's pipeline
        of the same class (SD2 for SD1.5), which the policy cannot read."""
        policy, fam = self.policy, self.family
        if policy.variant != "conditional":
            return
        tokens, pooled = policy.token_dim, policy.pooled_dim
        if tokens != fam.token_dim or (pooled and pooled != fam.pooled_dim):
            read = f"text tokens of width {tokens}" + (f" and a pooled embedding of {pooled}" if pooled else "")
            give = f"{fam.token_dim}" + (f" and {fam.pooled_dim}" if pooled else "")
            raise ValueError(
                f"this policy read {read} in training; this pipeline's text encoders give {give}: another model's,"
                " which the policy cannot read"
            )

    # --- the policy's schedule for one instance ---------------------------------------------------

    def noise(self, seed: int | None = None, generator: torch.Generator | None = None) -> np.ndarray:
        """x_T [C, h, w] float32: of ``seed`` as the backend draws it in training, or from ``generator``."""
        if (seed is None) == (generator is None):
            raise ValueError("give exactly one of seed or generator")
        if seed is not None:
            # as the tools take it: 2**63 wrapped to seed 0's noise, 1.5 drew seed 1's, "0" and -1 were taken
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
                raise ValueError(f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
            return self.sampler.initial_noise([int(seed)])[0]
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__} {generator!r:.40}")
        # on the generator's own device (a CUDA generator, as diffusers' examples make, draws there)
        x = torch.randn(self.sampler.x_shape, generator=generator, dtype=torch.float32, device=generator.device)
        return x.cpu().numpy()

    def times(self, prompt: str, noise: np.ndarray) -> np.ndarray:
        """The L times the model is evaluated at (our time convention) for (prompt, noise): the
        policy's Dirichlet mean."""
        device = next(self.policy.parameters()).device
        inputs = policy_inputs(noise[None], self.sampler.encode([prompt]), device)
        return times_from_tau(dirichlet_mean(self.policy, inputs)[0])

    def __call__(
        self, prompt: str, seed: int | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """Keyword arguments of ``pipe(prompt, **kwargs)`` that run the learned schedule from the
        noise of ``seed`` (or ``generator``). One prompt: its schedule is its own (call once per
        prompt of a batch)."""
        if not isinstance(prompt, str):
            raise TypeError(
                f"prompt must be one str (call once per prompt: each has its own schedule), got {prompt!r:.80}"
            )
        check_prompts([prompt], "prompt")  # as the tools take it: not empty, no control characters
        noise = self.noise(seed, generator)
        times = self.times(prompt, noise)
        # one image: its schedule and noise are its own (another num_images_per_prompt is Python's one-line TypeError)
        return {"latents": self.latents(noise), "num_images_per_prompt": 1, **self.schedule_kwargs(times)}

    def global_schedule(self, batch: int | None = None) -> dict[str, Any]:
        """A global policy's one schedule (its Dirichlet mean), as ``sigmas=`` or ``timesteps=``
        (plain lists) with ``num_inference_steps``, ``height`` and ``width``: no extra model.
        ``batch``: the length of the list of prompts the pipeline is called with, if a list; the
        negative prompt of training then goes as a list as long (SD1.x refuses a str beside a list)."""
        out = self.schedule_kwargs(times_from_tau(np.asarray(self.policy.global_mean_tau())))
        if batch is not None:
            if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
                raise ValueError(f"batch must be the number of prompts, an integer from 1, got {batch!r}")
            if isinstance(out.get("negative_prompt"), str):
                out["negative_prompt"] = [out["negative_prompt"]] * int(batch)
        return out

    # --- from our times to the pipeline's arguments -----------------------------------------------

    def latents(self, noise: np.ndarray) -> torch.Tensor:
        """x_T in the form the pipeline takes as ``latents`` (Flux packs 2x2 patches)."""
        from diffusers import FluxPipeline

        dtype = (getattr(self.pipe, "transformer", None) or self.pipe.unet).dtype
        x = torch.from_numpy(noise[None]).to(self.pipe._execution_device, dtype)
        if isinstance(self.pipe, FluxPipeline):
            x = FluxPipeline._pack_latents(x, 1, *x.shape[1:])
        return x

    def schedule_kwargs(self, times: np.ndarray) -> dict[str, Any]:
        """``times`` as the pipeline's ``sigmas=`` or ``timesteps=``, with the steps, the size and
        the training's call settings (``call_kwargs``)."""
        times = np.asarray(times, dtype=np.float64)
        # the pipeline's scheduler as it is now: one swapped in after this was built ran other times silently
        self._check_scheduler()
        self._check_reads()
        size = {"num_inference_steps": len(times), "height": self.family.height, "width": self.family.width}
        if hasattr(self.pipe, "transformer"):  # a flow model: sigmas the scheduler's own shift maps onto ours
            return {**self.call_kwargs, "sigmas": [float(s) for s in self._unshift(times)], **size}
        n_train = self.pipe.scheduler.config.num_train_timesteps
        # training runs t < 1/T at sigma(t) = t*T x the lowest sigma, which a stock Euler cannot; said where that
        # is 1% or more below it (an 'init: default' policy's last time is 0.000999: 0.1%, no matter)
        below = times[times < 0.99 / n_train]
        if below.size:
            warnings.warn(
                f"the schedule evaluates the model at t = {below.min():.3g}, below its least noisy training timestep"
                f" (t = 1/{n_train}); training ran that step at a noise level below the model's lowest, which a"
                " stock EulerDiscreteScheduler cannot: it runs it at the lowest, and the image's last step differs"
                " slightly from training",
                UserWarning,
                stacklevel=3,
            )
        timesteps = epsilon_model_timesteps(times, n_train)  # the denoiser's timestep, never below 0, as in training
        return {**self.call_kwargs, "timesteps": [float(t) for t in timesteps], **size}

    def _unshift(self, times: np.ndarray) -> np.ndarray:
        """Sigmas s with shift(s) = times, for the pipeline's FlowMatchEulerDiscreteScheduler."""
        c = self.pipe.scheduler.config
        if c.get("use_dynamic_shifting"):
            mu = self.family._mu()  # the resolution-dependent shift the pipeline passes its scheduler
            scale = math.exp(mu) if c.get("time_shift_type", "exponential") == "exponential" else mu
            return 1.0 / (1.0 + scale * (1.0 / times - 1.0))
        shift = float(getattr(self.pipe.scheduler, "shift", c.get("shift", 1.0)))  # as set_shift left it
        return times / (shift - (shift - 1.0) * times)

    def _check_scheduler(self) -> None:
        """The pipeline's scheduler must map the returned arguments onto our times exactly."""
        from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

        sched = self.pipe.scheduler
        if hasattr(self.pipe, "transformer"):
            c = sched.config
            extra = [
                k
                for k in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
                if c.get(k)
            ]
            if not isinstance(sched, FlowMatchEulerDiscreteScheduler) or extra or c.get("invert_sigmas"):
                raise ValueError(
                    f"the pipeline's scheduler ({type(sched).__name__}{', ' + ', '.join(extra) if extra else ''})"
                    " does not take a schedule as plain shifted sigmas; use FlowMatchEulerDiscreteScheduler.from_config"
                    "(pipe.scheduler.config) without karras/exponential/beta sigmas or a terminal shift"
                )
            return
        c = sched.config
        # every setting a stock Euler needs, fixed in the one line the refusal gives (a fix of one only
        # met the next refusal: log_linear interpolation was kept by the from_config it advised)
        fix: dict[str, Any] = {
            k: v for k, v in (("interpolation_type", "linear"), ("final_sigmas_type", "zero")) if c.get(k, v) != v
        }
        fix.update({k: False for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if c.get(k)})
        if isinstance(sched, EulerDiscreteScheduler) and not fix:
            return
        has = [f"{k}={c[k]!r}" for k in fix]  # karras and the like: diffusers refuses timesteps= with them
        if "final_sigmas_type" in fix:
            has[list(fix).index("final_sigmas_type")] += " (it stops short of sigma 0, where the schedule ends)"
        has_them = f" with {', '.join(has)}" if has else ""
        args = "".join(f", {k}={v!r}" for k, v in fix.items())
        raise ValueError(
            "the learned schedule runs on Euler in sigma(timestep), linearly interpolated and ending at sigma 0, as"
            f" in training; the pipeline's scheduler is {type(sched).__name__}{has_them}:"
            f" set pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config{args})"
        )


def pipeline_kwargs(
    policy: SchedulePolicy,
    pipe: Any,
    prompt: str,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """One call: the keyword arguments of ``pipe(prompt, **out)`` that run ``policy``'s schedule
    for (prompt, the noise of ``seed`` or ``generator``). ``kwargs`` go to ``PipelineSchedule``;
    to make many images, build one ``PipelineSchedule`` and call it."""
    return PipelineSchedule(policy, pipe, **kwargs)(prompt, seed=seed, generator=generator)


if __name__ == "__main__":  # a Python API, not a command: it did nothing and said nothing
    import sys

    sys.exit(
        "rollout.export is used from Python: schedule = PipelineSchedule(policy, pipe); pipe(prompt,"
        " **schedule(prompt, seed=0)) (docs/use.md); for images from a run, python -m rollout.generate --run DIR"
    )
