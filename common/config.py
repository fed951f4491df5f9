"""The run configuration: every section, every field, documented where it is declared.

Precedence, lowest to highest: the defaults below, the YAML file given by ``--config``, then
dotted command-line flags (``--rollout.k=4``). The field descriptions are the ``--help`` text.
Unknown keys, wrong types and impossible values are errors that name the field.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, NoReturn, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from common.prompts import check_prompts, read_capped, read_prompt_file

BaselineName = Literal["none", "mean", "rloo", "xctx", "js", "js_loco"]


class Section(BaseModel):
    """A config section: unknown keys are errors, values are checked on assignment too, and
    every float is finite (inf and nan are refused)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_yes_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """A yes/no given for a number is refused: pydantic takes true as 1, and YAML reads yes, no,
        on and off as true and false (``max_restarts: yes`` was one restart, silently)."""
        if isinstance(value, bool) and info.field_name is not None:
            kinds = _kinds(cls.model_fields[info.field_name].annotation)
            if bool not in kinds and kinds & {int, float}:
                said = str(value).lower()
                raise ValueError(f"a number, not {said} (YAML reads yes, no, on and off as true and false)")
        return value


def _kinds(annotation: Any) -> set[Any]:
    """The plain types an annotation admits (through Optional, unions and Annotated)."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _kinds(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (Union, UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    return {annotation}


def _finite_numbers(value: Any, at: str = "") -> Any:
    """``value`` as it is, once every float in it (in nested mappings and lists too) is finite:
    keyword arguments are not typed, and a YAML ``.nan`` or ``.inf`` would reach a reward or a
    sampler unchecked, where it shows up only as non-finite scores once training has started."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{at or 'a value'} is {value}; every number in kwargs must be finite")
    if isinstance(value, dict):
        for k, v in value.items():
            _finite_numbers(v, f"{at}.{k}" if at else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _finite_numbers(v, f"{at}[{i}]")
    return value


#: Keyword arguments of a plug-in's ``__init__``: any JSON-like value, every number finite.
Kwargs = Annotated[dict[str, Any], AfterValidator(_finite_numbers)]


def _ray_share(value: float) -> float:
    """A quantity of a resource an actor reserves, as Ray takes it: 0, or at least 0.0001 (Ray's
    unit: less is its ValueError when the actor is made, after the run started)."""
    if value and value < 1e-4:
        raise ValueError(f"{value:g} is below 0.0001, the smallest share Ray reserves (0 reserves none)")
    return value


def _gpu_share(value: float) -> float:
    """A share of GPUs: a fraction of one (GPUs are packed per device) or whole GPUs."""
    _ray_share(value)
    if value > 1 and not float(value).is_integer():
        raise ValueError(f"{value:g} GPUs: more than one must be a whole number (Ray's rule), e.g. 1 or 2")
    return value


#: CPUs or GPUs an actor reserves (a Ray resource request), checked as Ray checks it.
CpuShare = Annotated[float, Field(ge=0, le=1024), AfterValidator(_ray_share)]
GpuShare = Annotated[float, Field(ge=0, le=64), AfterValidator(_gpu_share)]


#: The largest seed (a run's, a noise's): torch's generators take a signed 64-bit seed, and the
#: derived keys add to it, so 2^63 and beyond failed once the workers drew.
MAX_SEED = 2**62


class ExperimentConfig(Section):
    name: str = Field("digits", min_length=1, description="Run name; the run directory is <output_dir>/<name>.")
    seed: int = Field(
        0,
        ge=0,
        le=MAX_SEED,
        description="Run seed: every random draw (policy init, noises, schedules) derives from it.",
    )
    output_dir: Path = Field(Path("runs"), description="Directory that holds run directories.")

    @field_validator("output_dir", mode="before")
    @classmethod
    def _output_dir_given(cls, value: Any) -> Any:
        return home(_not_blank(value, "give a directory, '.' for the current one"))

    @field_validator("name")
    @classmethod
    def _name_stays_under_output_dir(cls, name: str) -> str:
        parts = Path(name).parts
        if Path(name).is_absolute() or any(p in ("..", ".") for p in parts) or "\x00" in name or not parts:
            raise ValueError(f"must be a relative path below output_dir without '.' or '..' parts, got {name!r}")
        if any(not p.strip() or any(c < " " for c in p) for p in parts):
            raise ValueError(f"each part must be a name, not blank or with a control character, got {name!r}")
        if any(len(p.encode()) > 255 for p in parts):  # NAME_MAX of every common filesystem
            raise ValueError(f"each part must be at most 255 bytes (a directory name), got {name[:40]!r}...")
        return name


def home(value: Any) -> Any:
    """A path given as ``~/runs`` (or ``~user/runs``) with the home directory in place, as the shell
    puts it where the path is a word of its own: after ``=`` (``--experiment.output_dir=~/runs``)
    the shell leaves it, and the run dir was ``./~/runs``, a directory named ``~`` here."""
    if isinstance(value, (str, Path)) and str(value).startswith("~"):
        return Path(value).expanduser() if isinstance(value, Path) else str(Path(value).expanduser())
    return value


def _not_blank(value: Any, instead: str) -> Any:
    """``value``, unless it is a blank string: the expansion of an unset variable
    (``--experiment.output_dir=$OUT``) is read as the current directory, silently."""
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"is blank (an unset variable in the command?): {instead}")
    return value


def _in_force(schedule: dict[int, Any], iteration: int, first: Any) -> Any:
    """The value of a {start iteration: value} schedule at ``iteration``; ``first`` before any start."""
    value = first
    for start in sorted(schedule):
        if iteration >= start:
            value = schedule[start]
    return value


class ToyConfig(Section):
    """The toy problem: a class-conditional Gaussian mixture sampled by an exact rectified flow."""

    dim: int = Field(4, ge=1, le=4096, description="Dimension D of a sample.")
    num_classes: int = Field(
        10, ge=1, le=100_000, description="Number of classes; prompts are 'class 0' .. 'class N-1'."
    )
    modes_per_class: int = Field(4, ge=1, le=10_000, description="Gaussian modes per class.")
    mode_scale: float = Field(1.0, gt=0, le=1e6, description="Standard deviation of the random mode centres.")
    spread: float = Field(0.1, gt=0, le=1e6, description="Standard deviation of each mode.")
    token_len: int = Field(4, ge=1, le=1024, description="Length of the fixed 'text token' embedding of a class.")
    token_dim: int = Field(16, ge=1, le=4096, description="Width of each 'text token'.")
    seed: int = Field(1234, ge=0, description="Seed that fixes the mixture and the class embeddings.")


class SimulatedConfig(Section):
    """The simulated backend (rollout/backends/simulated.py): the cost and shapes of a real sampler,
    no model. For capacity planning and bench/overhead.py."""

    preset: Literal["flux", "sd3", "sdxl", "tiny"] = Field(
        "flux", description="Backbone whose x_T, text-token and pooled shapes it has (the policy is that size)."
    )
    image_size: int = Field(1024, ge=1, le=8192, description="Side of its uint8 images.")
    seconds_per_image_step: float = Field(
        0.025, ge=0, le=3600, description="Seconds per image per model evaluation (sleeping, or busy on a GPU)."
    )
    seconds_per_call: float = Field(0.0, ge=0, le=3600, description="Fixed seconds per call of sample().")
    busy: Literal["sleep", "gpu"] = Field("sleep", description="'gpu': spend the time in matmuls on the GPU if any.")
    prompts: int = Field(64, ge=2, le=1_000_000, description="Number of (meaningless) train prompts.")


class DigitsConfig(Section):
    """The digits backend: a flow-matching MLP the project trains on scikit-learn's 8x8 digits."""

    hidden: int = Field(512, ge=8, le=16_384, description="Hidden width of the velocity MLP.")
    depth: int = Field(4, ge=1, le=64, description="Hidden layers of the velocity MLP.")
    emb_dim: int = Field(
        64, ge=2, le=4096, multiple_of=2, description="Width of the time and label embeddings (= token width)."
    )
    train_steps: int = Field(2500, ge=1, le=10_000_000, description="Training steps of the one-time (cached) training.")
    batch_size: int = Field(256, ge=1, le=65_536, description="Training batch size.")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate of the one-time training.")
    label_dropout: float = Field(0.1, ge=0, lt=1, description="Label dropout for classifier-free guidance.")
    seed: int = Field(0, ge=0, description="Seed of the one-time training (part of the cache key).")
    guidance_scale: float = Field(2.0, ge=0, description="Classifier-free guidance scale at sampling.")


class DiffusersSection(Section):
    """Options shared by the diffusers backends (flux, sd3, sd); each family sets its own defaults."""

    model: str = Field(..., min_length=1, description="Hub id or local directory of the diffusers pipeline.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    local_files_only: bool = Field(False, description="Never contact the hub: load from the local cache or path only.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("bfloat16", description="Dtype of the model weights.")
    device: str = Field(
        "auto",
        min_length=1,
        description="Torch device of the models ('auto': the GPU share a rollout worker was given by rollout.num_gpus,"
        " or in a command that samples in its own process the first GPU it sees; else cpu).",
    )
    cpu_offload: Literal["none", "model", "sequential"] = Field(
        "none", description="diffusers CPU offload: 'model' (enable_model_cpu_offload), 'sequential', or 'none'."
    )
    attention_backend: str | None = Field(
        None, description="diffusers attention backend of the denoiser ('flash', '_native_cudnn', ...); None: default."
    )
    height: int | None = Field(
        None, ge=8, le=16_384, description="Image height in pixels (None: the pipeline's default)."
    )
    width: int | None = Field(
        None, ge=8, le=16_384, description="Image width in pixels (None: the pipeline's default)."
    )
    guidance_scale: float = Field(
        ..., ge=0, description="Guidance scale (classifier-free, or Flux-Dev's embedded guidance)."
    )
    max_batch_size: int = Field(
        8, ge=1, le=4096, description="Most samples per denoiser forward (a larger request runs in chunks)."
    )
    prompt_cache: int = Field(
        256, ge=1, le=1_000_000, description="Prompts whose encoder outputs are kept (least recently used evicted)."
    )
    prompt_file: Path | None = Field(
        None, description="Training prompts, one per line (None: the built-in list in rollout/backends/prompts.py)."
    )
    eval_prompt_file: Path | None = Field(
        None, description="Held-out prompts, one per line (None: the built-in held-out list)."
    )

    @field_validator("prompt_file", "eval_prompt_file", mode="before")
    @classmethod
    def _prompt_file_given(cls, value: Any) -> Any:
        return home(_not_blank(value, "give a file of prompts, or leave it out for the built-in list"))

    @field_validator("prompt_file", "eval_prompt_file")
    @classmethod
    def _prompt_file_readable(cls, path: Path | None) -> Path | None:
        if path is not None:
            read_prompt_file(path)  # UTF-8, non-empty, every prompt visible and within the length limit
        return path


class FluxConfig(DiffusersSection):
    """Flux (FluxPipeline): rectified flow on packed latents, T5 + CLIP text encoders, no CFG."""

    model: str = Field(
        "black-forest-labs/FLUX.1-dev", min_length=1, description="Hub id or local directory of the Flux pipeline."
    )
    height: int | None = Field(
        1024, ge=16, le=16_384, description="Image height in pixels (None: the pipeline's default, 1024)."
    )
    width: int | None = Field(
        1024, ge=16, le=16_384, description="Image width in pixels (None: the pipeline's default, 1024)."
    )
    guidance_scale: float = Field(
        3.5,
        ge=0,
        description="Flux-Dev's embedded guidance (ignored by models without a guidance embedding, e.g. Schnell).",
    )
    max_sequence_length: int = Field(512, ge=1, le=512, description="T5 sequence length the prompt is padded to.")


class SD3Config(DiffusersSection):
    """Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline): rectified flow, CLIP-L/G + T5, classifier-free guidance."""

    model: str = Field(
        "stabilityai/stable-diffusion-3.5-large",
        min_length=1,
        description="Hub id or local directory of the SD3 pipeline.",
    )
    height: int | None = Field(
        1024, ge=8, le=16_384, description="Image height in pixels (None: the pipeline's default)."
    )
    width: int | None = Field(
        1024, ge=8, le=16_384, description="Image width in pixels (None: the pipeline's default)."
    )
    guidance_scale: float = Field(3.5, ge=0, description="Classifier-free guidance scale (<= 1: no guidance).")
    negative_prompt: str | None = Field(None, description="Negative prompt of classifier-free guidance (None: empty).")
    max_sequence_length: int = Field(256, ge=1, le=512, description="T5 sequence length the prompt is padded to.")


class SDConfig(DiffusersSection):
    """Stable Diffusion 1.x / 2.x and SDXL (StableDiffusion[XL]Pipeline): epsilon UNet, Euler, CFG."""

    model: str = Field(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        min_length=1,
        description="Hub id or local directory of an SD1.5 or SDXL pipeline (the family is read from"
        " model_index.json).",
    )
    guidance_scale: float = Field(7.5, ge=0, description="Classifier-free guidance scale (<= 1: no guidance).")
    negative_prompt: str | None = Field(None, description="Negative prompt of classifier-free guidance (None: empty).")


#: The built-in sampler backends (each with its own section below).
BUILTIN_BACKENDS = ("toy", "digits", "flux", "sd3", "sd", "simulated")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


class SamplerConfig(Section):
    backend: str = Field(
        "digits",
        description="Sampler backend: 'toy', 'digits', a diffusers pipeline ('flux', 'sd3' for SD3/3.5, 'sd' for"
        " SD1.5/SDXL), 'simulated' (a real sampler's cost and shapes, no model), or a user's sampler by import"
        " path 'pkg.module:Class' (docs/backends.md).",
    )
    kwargs: Kwargs = Field(
        default_factory=dict, description="Keyword arguments of a sampler named by import path (its __init__)."
    )
    runtime_env: dict[str, Any] | None = Field(
        None, description="Ray runtime_env of the rollout workers (a plug-in sampler's own dependencies)."
    )
    toy: ToyConfig = Field(default_factory=ToyConfig, description="Options of the toy backend.")
    digits: DigitsConfig = Field(default_factory=DigitsConfig, description="Options of the digits backend.")
    flux: FluxConfig = Field(default_factory=FluxConfig, description="Options of the flux backend.")
    sd3: SD3Config = Field(default_factory=SD3Config, description="Options of the sd3 backend.")
    sd: SDConfig = Field(default_factory=SDConfig, description="Options of the sd backend (SD1.5 and SDXL).")
    simulated: SimulatedConfig = Field(
        default_factory=SimulatedConfig, description="Options of the simulated backend (cost and shapes, no model)."
    )

    @model_validator(mode="after")
    def _backend_is_known(self) -> SamplerConfig:
        b = self.backend
        if b not in BUILTIN_BACKENDS and not _IMPORT_PATH.match(b):
            raise ValueError(
                f"backend {b!r} is neither a built-in ({', '.join(BUILTIN_BACKENDS)}) nor an import path"
                " 'pkg.module:Class'"
            )
        if b in BUILTIN_BACKENDS and self.kwargs:
            raise ValueError(f"kwargs are for a sampler named by import path; the {b!r} backend reads sampler.{b}")
        return self


class PolicyConfig(Section):
    variant: Literal["conditional", "global"] = Field(
        "conditional",
        description="'conditional': alpha from (x_T, text) in one forward pass; 'global': one"
        " learnable alpha for all contexts.",
    )
    init: Literal["scratch", "default"] = Field(
        "default",
        description="'scratch': standard init (the paper); 'default': Dirichlet mean = the backend's default schedule.",
    )
    concentration: float = Field(
        20.0,
        gt=0,
        le=1e6,
        description="Sum of alpha at init when init='default' (higher: closer to the default schedule).",
    )
    alpha_min: float = Field(
        1e-3,
        gt=0,
        le=10,
        description="alpha = softplus(h) + alpha_min. The paper's 1e-3 lets a component's alpha approach 0, where"
        " its score (variance ~ 1/alpha^2) swamps the gradient; 1 keeps every score bounded (docs/method.md).",
    )
    max_concentration: float | None = Field(
        None,
        gt=0,
        le=1e6,
        description="Cap on sum(alpha): alpha is scaled down to it, keeping the Dirichlet mean (the schedule that is"
        " evaluated) and a floor on exploration. None: no cap (the paper).",
    )
    concentration_schedule: dict[int, Annotated[float, Field(gt=0, le=1e6)]] = Field(
        default_factory=dict,
        description="A looser cap late in training: {iteration: cap} sets max_concentration from that iteration on,"
        " e.g. {6000: 100} (docs/method.md: exploration first, then a policy whose samples sit closer to the mean that"
        " is evaluated). Empty: max_concentration throughout.",
    )
    widths: list[Annotated[int, Field(ge=1, le=16_384)]] = Field(
        [32, 32, 64, 64], min_length=1, description="Channels of each conv block (4 blocks in the paper)."
    )
    attn_heads: int = Field(4, ge=1, le=256, description="Heads of each cross-attention layer.")
    groups: int = Field(8, ge=1, description="GroupNorm groups (must divide every width).")
    head_hidden: int = Field(128, ge=1, le=16_384, description="Hidden width of the 2-layer MLP head.")
    use_pooled: bool = Field(True, description="Feed the pooled text embedding to the head.")

    def max_concentration_at(self, iteration: int) -> float | None:
        """The cap of ``iteration`` (0-based): ``max_concentration``, or the schedule's entry in force."""
        return _in_force(self.concentration_schedule, iteration, self.max_concentration)

    @model_validator(mode="after")
    def _schedule_needs_a_cap(self) -> PolicyConfig:
        if any(i < 0 for i in self.concentration_schedule):
            raise ValueError("concentration_schedule needs iterations >= 0")
        if self.concentration_schedule and self.max_concentration is None:
            raise ValueError("concentration_schedule changes max_concentration: set max_concentration (the first cap)")
        return self

    @model_validator(mode="after")
    def _groups_divide_widths(self) -> PolicyConfig:
        bad = [w for w in self.widths if w % self.groups]
        if bad:
            raise ValueError(f"groups={self.groups} must divide every width; it does not divide {bad}")
        bad = [w for w in self.widths if w % self.attn_heads]
        if bad:
            raise ValueError(f"attn_heads={self.attn_heads} must divide every width; it does not divide {bad}")
        return self


#: Most rollouts per context (``rollout.k`` and every ``k_schedule`` entry).
MAX_K = 1024
#: The most model evaluations (L) a sample may take.
MAX_STEPS = 1000
#: The fewest and the most held-out noises per prompt (two: a standard error needs them).
EVAL_SEEDS = (2, 1_000_000)


#: NFE of the many-step reference sample when a reward compares with it and the config leaves
#: rollout.reference_steps unset.
DEFAULT_REFERENCE_STEPS = 64

#: A device setting: 'auto', 'cpu', 'cuda' or 'cuda:N' (common.devices.resolve_device).
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"


class RolloutConfig(Section):
    num_workers: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = Field(
        2,
        description="Number of RolloutWorker actors, or 'auto': one per rollout.num_gpus share of the GPUs the cluster"
        " has when the run starts.",
    )
    max_workers: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Elastic scale-out: between iterations the run starts more workers when the cluster has room"
        " for them (nodes joined, the autoscaler asked for them), up to this many started in all: a worker that died"
        " for good (rollout.max_restarts spent) is not replaced. None: the starting count only."
        " Set rollout.micro_batch too, so that requests do not depend on the number of workers.",
    )
    k: int = Field(2, ge=2, le=MAX_K, description="K: rollouts (schedules) per context.")
    k_schedule: dict[int, int] = Field(
        default_factory=dict,
        description="A larger K late in training: {iteration: K} sets K from that iteration on, e.g."
        " {3000: 8, 4000: 16}"
        " (docs/method.md: at K = 2 a context's rollouts differ by more than the noise's effect). Empty: K throughout.",
    )
    steps: int = Field(4, ge=1, le=MAX_STEPS, description="L: model evaluations (NFE) per sample.")
    contexts_per_iter: int = Field(16, ge=1, le=65_536, description="C: contexts (prompt, seed) per iteration.")
    micro_batch: int | None = Field(
        None,
        ge=1,
        le=65_536,
        description="Contexts per request (micro-batch): each request's images go to a reward server as soon as they"
        " exist, so scoring overlaps the sampling of the next. None: C split evenly, one request per worker (no"
        " overlap; the least overhead for a fast sampler). For samplers of a second or more per image, 1 or 2.",
    )
    policy_device: str = Field(
        "auto",
        pattern=DEVICE_PATTERN,
        description="Device of the workers' policy copy: 'auto' (the GPU share the worker was given by"
        " rollout.num_gpus, else cpu), 'cpu', 'cuda' or 'cuda:N'.",
    )
    image_threads: int = Field(
        4,
        ge=1,
        le=256,
        description="Threads on which each worker downscales its images to what the rewards read, one image each"
        " (the same images for any number): at 1024² the resize is most of a request's CPU work, and a GPU node's"
        " cores sit idle while it samples.",
    )
    num_cpus: CpuShare = Field(0.5, description="CPUs reserved by each rollout worker.")
    num_gpus: GpuShare = Field(0.0, description="GPUs reserved by each rollout worker.")
    min_workers: int = Field(1, ge=1, description="The run stops when fewer workers than this are alive.")
    max_restarts: int = Field(
        3, ge=0, le=1_000_000, description="Restarts of a dead rollout worker or reward server (Ray max_restarts)."
    )
    restart_timeout_s: float = Field(
        120.0, gt=0, description="Seconds a restarting actor has to answer before it counts as dead."
    )
    max_attempts: int = Field(5, ge=1, le=100, description="Sends of one rollout request before the step fails.")
    prompt_cache: int = Field(
        256,
        ge=0,
        le=1_000_000,
        description="Prompts whose policy features (text tokens) a worker keeps, least recently used evicted"
        " (0: none kept). With T5 features a prompt holds megabytes.",
    )
    start_timeout_s: float = Field(
        600.0, gt=0, le=86_400, description="Seconds a rollout worker has to start (build its sampler, load the model)."
    )
    sample_timeout_s: float = Field(
        120.0,
        gt=0,
        le=86_400,
        description="Seconds a worker has for one request, plus sample_timeout_per_nfe_s per model evaluation in it"
        " (contexts x K x L, plus the reference samples). A unit past its time counts as a fault: the worker is"
        " restarted and the unit re-sent; a second time-out of the same unit stops the run.",
    )
    sample_timeout_per_nfe_s: float = Field(
        2.0, ge=0, le=3600, description="Seconds added to sample_timeout_s per model evaluation of a request."
    )
    reference_steps: int | None = Field(
        None,
        ge=0,
        le=1000,
        description="NFE of a many-step reference sample (the backend's default schedule) made once per context"
        " and shared by its K rollouts, for rewards that compare with it ('fidelity'); costs this many extra NFE"
        " per context. None: 64 if a configured reward needs it, else 0 (no reference).",
    )

    @model_validator(mode="after")
    def _k_schedule_valid(self) -> RolloutConfig:
        bad = {i: k for i, k in self.k_schedule.items() if i < 0 or not 2 <= k <= MAX_K}
        if bad:
            raise ValueError(f"k_schedule needs iterations >= 0 and 2 <= K <= {MAX_K}; got {bad}")
        return self

    def k_at(self, iteration: int) -> int:
        """K of ``iteration`` (0-based): ``k``, or the ``k_schedule`` entry in force."""
        return _in_force(self.k_schedule, iteration, self.k)


class RewardSpec(Section):
    name: str = Field(
        ..., min_length=1, description="A registered reward name ('toy') or an import path 'pkg.module:Class'."
    )
    weight: float = Field(1.0, ge=-1e6, le=1e6, description="Weight of this reward in the combined reward.")
    kwargs: Kwargs = Field(default_factory=dict, description="Keyword arguments of the reward's __init__.")
    num_servers: int = Field(1, ge=1, le=1024, description="RewardServer actors hosting this reward.")
    num_cpus: CpuShare = Field(0.5, description="CPUs reserved by each of its servers.")
    num_gpus: GpuShare = Field(0.0, description="GPUs reserved by each of its servers.")
    runtime_env: dict[str, Any] | None = Field(None, description="Ray runtime_env of its servers (own dependencies).")
    start_timeout_s: float = Field(
        600.0, gt=0, le=86_400, description="Seconds each server has to build the reward (its __init__: model loads)."
    )
    timeout_s: float = Field(
        60.0,
        gt=0,
        le=86_400,
        description="Seconds one scoring call may take, plus timeout_per_image_s per image. A call past its time"
        " counts as a fault (server restarted, unit re-sent); a second time-out of the same unit stops the run.",
    )
    timeout_per_image_s: float = Field(2.0, ge=0, le=3600, description="Seconds added to timeout_s per image scored.")

    def score_timeout(self, images: int) -> float:
        return self.timeout_s + self.timeout_per_image_s * images


def reward_keys(specs: list[RewardSpec]) -> list[str]:
    """Each reward's key in metrics, logs and tables: its name, numbered where the same reward
    appears twice (``fidelity#0``, ``fidelity#1``)."""
    names = [s.name for s in specs]
    return [n if names.count(n) == 1 else f"{n}#{j}" for j, n in enumerate(names)]


class MetricSpec(Section):
    name: str = Field(..., min_length=1, description="A registered metric name ('digits_fd') or 'pkg.module:Class'.")
    kwargs: Kwargs = Field(default_factory=dict, description="Keyword arguments of the metric's __init__.")
    num_cpus: CpuShare = Field(0.25, description="CPUs reserved by its server.")
    num_gpus: GpuShare = Field(0.0, description="GPUs reserved by its server.")
    start_timeout_s: float = Field(600.0, gt=0, le=86_400, description="Seconds its server has to build the metric.")
    timeout_s: float = Field(
        3600.0, gt=0, le=86_400, description="Seconds the whole held-out measurement may take (features and distance)."
    )
    noise_resamples: int = Field(
        50,
        ge=0,
        le=10_000,
        description="Bootstrap resamples that measure the metric's own sampling noise (reported as +-; each costs"
        " one more distance per schedule and two per paired difference to the default: lower it for a 2048-dim FID);"
        " 0: not measured.",
    )


class LearnerConfig(Section):
    iterations: int = Field(500, ge=1, le=100_000_000, description="Policy updates in the run.")
    baseline: BaselineName = Field("js", description="Reward baseline (docs/method.md).")
    lr: float = Field(1e-3, gt=0, le=10, description="AdamW learning rate (the peak, with a schedule).")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="'constant', or 'cosine': from lr down to lr * lr_final_ratio over the run's iterations.",
    )
    lr_final_ratio: float = Field(
        0.1, ge=0, le=1, description="The cosine schedule's last learning rate, as a share of lr."
    )
    weight_decay: float = Field(1e-4, ge=0, le=10, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, le=1e6, description="Gradient-norm clip.")
    adv_std_norm: bool = Field(False, description="Divide advantages by their batch std (off: plain REINFORCE).")
    checkpoint_every: int = Field(100, ge=1, description="Write a checkpoint every N iterations (and at the end).")
    keep_checkpoints: int = Field(3, ge=1, le=10_000, description="Checkpoints kept on disk.")
    checkpoint_dir: str | None = Field(
        None,
        description="Where checkpoints go: a path or an fsspec URL such as s3://bucket/run (None:"
        " <run dir>/checkpoints).",
    )

    @field_validator("checkpoint_dir", mode="before")
    @classmethod
    def _checkpoint_dir_given(cls, value: Any) -> Any:
        return home(_not_blank(value, "give a path or a URL, or leave it out for <run dir>/checkpoints"))

    eval_every: int = Field(0, ge=0, description="Evaluate every N iterations (0: only at the end).")
    eval_prompts: list[str] | None = Field(None, description="Held-out prompts (None: the backend's eval prompts).")
    eval_seeds: int = Field(100, ge=EVAL_SEEDS[0], le=EVAL_SEEDS[1], description="Held-out noises per eval prompt.")
    eval_metrics: list[MetricSpec] = Field(
        default_factory=lambda: [MetricSpec(name="digits_fd")],
        description="Set-level metrics of the held-out evaluation (not rewards), e.g. a Frechet distance.",
    )
    global_baseline: bool = Field(
        True, description="Also train a 'global' policy (one schedule for all) and add it to the final table."
    )
    global_lr: float = Field(
        0.2,
        gt=0,
        le=10,
        description="AdamW learning rate of the learned global schedule: its L+1 parameters are the Dirichlet's"
        " own (softplus^-1 of alpha), which need far larger steps than a network's weights to converge.",
    )
    plots: bool = Field(True, description="Write PNGs of schedules, samples and the reward curve into the run dir.")
    train_prompts: list[str] | None = Field(None, description="Training prompts (None: the backend's train prompts).")
    torch_threads: int = Field(
        1,
        ge=1,
        le=1024,
        description="Torch CPU threads of the learner: fixed, so a run is bit-reproducible on any machine.",
    )
    rollout_log: bool = Field(True, description="Append every rollout's record to rollouts.msgpack in the run dir.")
    device: str = Field(
        "auto",
        pattern=DEVICE_PATTERN,
        description="Device of the learner's policy and update: 'auto' (cuda if the learner sees a GPU, else cpu),"
        " 'cpu', 'cuda' or 'cuda:N'.",
    )
    broadcast: Literal["object_store", "collective"] = Field(
        "object_store",
        description="How each version of the weights reaches the workers. object_store: ray.put once, each worker"
        " fetches it. collective: also one torch.distributed broadcast from the learner (NCCL on a GPU, gloo"
        " otherwise) into every worker, the object store kept as the fallback (docs/performance.md).",
    )
    broadcast_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="Seconds a collective broadcast (or forming its group) may take."
    )
    broadcast_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Precision of the weights sent to the workers each iteration. float32: the workers sample from"
        " exactly the learner's policy. bfloat16/float16: half the bytes; the workers' copy is rounded, so"
        " learner/logp_drift is no longer 0 (the update still scores the executed draws under the learner's"
        " weights).",
    )
    pipeline: bool = Field(
        False,
        description="One step off policy: iteration t+1's rollouts are sampled under the weights before update t"
        " while the learner computes it; they go out while iteration t's are under way and each worker queues"
        " them, so neither the update nor the scoring of the last images leaves the workers waiting. The update is"
        " importance weighted (pi / mu, from each rollout's recorded behaviour log-prob); checkpoints keep the"
        " behaviour weights, so a resume is exact. Off: every update uses rollouts of the weights it starts from.",
    )
    progress: bool = Field(True, description="Show a tqdm progress bar.")

    @field_validator("train_prompts", "eval_prompts")
    @classmethod
    def _prompts_given(cls, prompts: list[str] | None) -> list[str] | None:
        # an empty list is an error, not a silent fall-back to the backend's prompts
        return None if prompts is None else check_prompts(prompts)


class RayConfig(Section):
    num_cpus: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="CPUs of a local cluster started by this run (ignored when joining a cluster).",
    )
    num_gpus: int | None = Field(None, ge=0, le=1_000_000, description="GPUs of a local cluster started by this run.")
    init_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments of ray.init().")

    @field_validator("init_kwargs")
    @classmethod
    def _known_to_ray(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Each key is an argument of ``ray.init`` (or one of its private ``_`` ones, which Ray
        checks itself): a misspelt one is a config mistake here, not a RuntimeError at startup."""
        if not kwargs:
            return kwargs
        import inspect

        import ray

        known = [n for n, a in inspect.signature(ray.init).parameters.items() if a.kind is not a.VAR_KEYWORD]
        unknown = [k for k in kwargs if k not in known and not k.startswith("_")]
        if unknown:
            raise ValueError(
                f"{', '.join(map(repr, unknown))}: not an argument of ray.init (it takes {', '.join(known)})"
            )
        return kwargs


class Config(BaseSettings):
    """steinsched: learn instance-level sampling schedules with REINFORCE and a James-Stein baseline."""

    model_config = SettingsConfigDict(
        extra="forbid",
        validate_assignment=True,
        cli_prog_name="python -m learner.main",
        cli_exit_on_error=False,  # a mistake is one line (load_config), not the usage of every field
        cli_implicit_flags=False,
        cli_avoid_json=False,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The file and the flags only (the command line's source comes first on its own): no
        variable of the environment changes a run. A settings class reads one per field, in any
        case, so a stray ``OVERWRITE=1`` (or ``RESUME``, ``CONFIG``, ``POLICY``...) deleted a run,
        resumed one, or read no file, without a word."""
        return (init_settings,)

    config: Path | None = Field(None, description="YAML file with any of the sections below; flags override it.")
    resume: str | None = Field(
        None,
        description="'auto': continue from the latest complete checkpoint in the run dir; or a checkpoint path: one"
        " of this run's continues from it, another run's starts this run from it (its logs up to there copied).",
    )
    resume_changes: bool = Field(
        False, description="Allow --resume with a config that differs from the checkpoint's in a field that matters."
    )
    overwrite: bool = Field(
        False,
        description="Replace the earlier run in the run dir (its checkpoints too): removed once this run has started.",
    )
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig, description="Name, seed, output.")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="The frozen sampler.")
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="The schedule policy.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout workers and batch shape.")
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(name="fidelity")],
        min_length=1,
        description="Rewards and their weights; on the command line a list as in the file: --rewards='[{name: hps}]'.",
    )
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="Optimisation and evaluation.")
    ray: RayConfig = Field(default_factory=RayConfig, description="ray.init() settings.")

    @model_validator(mode="after")
    def _resume_or_overwrite(self) -> Config:
        if self.resume is not None and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other: continue the run, or replace it")
        r = self.resume
        if r is not None and re.fullmatch(r"ckpt-\d+", r):  # a name: one of this run's checkpoints
            where = self.checkpoint_root
            self.__dict__["resume"] = r = f"{where.rstrip('/')}/{r}"  # as given: no second validation
            if "://" not in r and not (Path(r) / "state.json").is_file():
                raise ValueError(f"--resume {Path(r).name}: no such checkpoint in {where}")
        if r is not None and r != "auto" and "://" not in r and not (Path(r) / "state.json").is_file():
            raise ValueError(
                f"--resume takes 'auto', the name of one of the run's checkpoints (ckpt-00000300) or a checkpoint's"
                f" directory, got {r!r}"
            )
        return self

    @model_validator(mode="after")
    def _batch_fits_baseline(self) -> Config:
        c, base = self.rollout.contexts_per_iter, self.learner.baseline
        need = {"xctx": 2, "js": 2, "js_loco": 3}.get(base, 1)
        if c < need:
            raise ValueError(
                f"rollout.contexts_per_iter={c} is too small for learner.baseline={base!r}: it needs at least {need}"
            )
        r = self.rollout
        if r.num_workers != "auto" and r.min_workers > r.num_workers:
            raise ValueError(f"rollout.min_workers={r.min_workers} exceeds rollout.num_workers={r.num_workers}")
        if r.num_workers != "auto" and r.max_workers is not None and r.max_workers < r.num_workers:
            raise ValueError(f"rollout.max_workers={r.max_workers} is below rollout.num_workers={r.num_workers}")
        if r.num_workers == "auto" and r.num_gpus <= 0:
            raise ValueError("rollout.num_workers='auto' starts one worker per GPU share: set rollout.num_gpus > 0")
        if all(spec.weight == 0 for spec in self.rewards):
            raise ValueError(
                "rewards: every weight is 0, so every sample's reward is 0 and nothing is learned; give a reward a"
                " weight (negative ones are penalties)"
            )
        pc = self.policy
        floor = pc.alpha_min * (r.steps + 1)  # the least sum(alpha) the floor alpha_min allows
        caps = {"policy.max_concentration": pc.max_concentration}
        caps |= {f"policy.concentration_schedule[{i}]": c for i, c in pc.concentration_schedule.items()}
        for name, cap in caps.items():
            if cap is not None and cap < floor:
                raise ValueError(
                    f"{name}={cap:g} is below policy.alpha_min x (rollout.steps + 1) = {floor:g}: scaled down to it,"
                    " every alpha would fall below its floor alpha_min; raise the cap or lower alpha_min"
                )
        return self

    @property
    def run_dir(self) -> Path:
        return self.experiment.output_dir / self.experiment.name

    @property
    def checkpoint_root(self) -> str:
        """Where this run's checkpoints go: ``learner.checkpoint_dir`` (a path or a URL), else
        ``<run dir>/checkpoints``."""
        return self.learner.checkpoint_dir or str(self.run_dir / "checkpoints")

    @property
    def trains_global_first(self) -> bool:
        """Whether ``python -m learner.main`` trains the learned global schedule (the baseline to
        beat) before this run's policy, in ``<run dir>/global``."""
        return self.learner.global_baseline and self.policy.variant == "conditional"

    def never_in_force(self) -> list[str]:
        """Schedule entries at an iteration the run never reaches (a longer run's config run
        shorter): each schedule's in one line, for a warning."""
        n = self.learner.iterations
        out = []
        for field, schedule in (
            ("rollout.k_schedule", self.rollout.k_schedule),
            ("policy.concentration_schedule", self.policy.concentration_schedule),
        ):
            late = sorted(i for i in schedule if i >= n)
            if late:
                at = ", ".join(map(str, late))
                out.append(f"{field} at iteration {at} is never in force: the run has learner.iterations={n}")
        return out

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude=RUN_FLAGS)
        return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


#: Top-level fields about this invocation, not the run (never saved, never compared).
RUN_FLAGS = {"config", "resume", "resume_changes", "overwrite"}

#: Fields that may change between a checkpoint and its resume: scale, logging and evaluation.
#: Any other difference (seed, sampler, policy, K, L, C, rewards, optimisation) is refused.
RESUME_FREE = {
    "experiment.output_dir",
    "ray",
    "learner.iterations",
    "learner.progress",
    "learner.checkpoint_every",
    "learner.keep_checkpoints",
    "learner.eval_every",
    "learner.eval_prompts",
    "learner.eval_seeds",
    "learner.eval_metrics",
    "learner.global_baseline",
    "learner.plots",
    "learner.rollout_log",
    "learner.torch_threads",
    "learner.checkpoint_dir",
    "rollout.num_workers",
    "rollout.max_workers",
    "rollout.num_cpus",
    "rollout.num_gpus",
    "rollout.min_workers",
    "rollout.max_restarts",
    "rollout.restart_timeout_s",
    "rollout.max_attempts",
    "rollout.start_timeout_s",
    "rollout.sample_timeout_s",
    "rollout.prompt_cache",
    "sampler.runtime_env",
    "rollout.sample_timeout_per_nfe_s",
    "rollout.micro_batch",
    "rollout.policy_device",
    "rollout.image_threads",
    "learner.device",
}
_REWARD_RESOURCES = {
    "num_servers",
    "num_cpus",
    "num_gpus",
    "runtime_env",
    "start_timeout_s",
    "timeout_s",
    "timeout_per_image_s",
}


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted names where two dumped configs differ, in ``old``'s order: a section's field (only
    the fields ``old`` records: one added to the config since is not compared), or a whole
    section that is not a mapping (``rewards``)."""
    out = []
    for section in dict.fromkeys([*old, *new]):
        x, y = old.get(section), new.get(section)
        if isinstance(x, dict) and isinstance(y, dict):
            out += [f"{section}.{k}" for k in x if x[k] != y.get(k)]
        elif x != y:
            out.append(section)
    return out


def resume_conflicts(saved: dict[str, Any], cfg: Config) -> list[str]:
    """Dotted names of the fields that matter where ``cfg`` differs from a checkpoint's config.
    A field the checkpoint does not record (added to the config since) is not compared."""
    now = cfg.model_dump(mode="json", exclude=RUN_FLAGS)
    out = []
    for name in changed_fields(saved, now):
        if name == "rewards":  # their resources and time-outs may change

            def strip(rs: list[dict] | None, known: set[str]) -> list[dict]:
                return [{k: v for k, v in r.items() if k in known and k not in _REWARD_RESOURCES} for r in rs or []]

            known = set().union(*(r.keys() for r in saved.get("rewards") or [{}]))
            if strip(saved.get("rewards"), known) != strip(now.get("rewards"), known):
                out.append(name)
        elif name not in RESUME_FREE and name.split(".")[0] not in RESUME_FREE:
            out.append(name)
    return sorted(out)


#: Fields that set the policy's parameter shapes: a checkpoint's weights load into no other.
POLICY_SHAPE = ("rollout.steps", "policy.widths", "policy.head_hidden", "policy.use_pooled", "sampler.backend")


def shape_changes(saved: dict[str, Any], cfg: Config) -> list[str]:
    """``field (old -> new)`` for each field of POLICY_SHAPE where ``cfg`` differs from a
    checkpoint's config: no --resume_changes can resume across them."""
    now = cfg.model_dump(mode="json", exclude=RUN_FLAGS)
    out = []
    for name in POLICY_SHAPE:
        section, field = name.split(".")
        old, new = (saved.get(section) or {}).get(field), (now.get(section) or {}).get(field)
        if old is not None and old != new:
            out.append(f"{name} ({old} -> {new})")
    return out


class ConfigError(ValueError):
    """A user's config mistake, with a message fit to print as it is."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (YAML says keys are unique;
    PyYAML would keep the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, (str, int, float, bool)) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark
            )
        if isinstance(key, (str, int, float, bool)):
            seen[key] = key_node.start_mark
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# A number written without a point (1e-3, 1e400, -1e1) is a float, as YAML 1.2 and JSON read it;
# PyYAML's YAML 1.1 read it as a string, which a typed field converts but a reward's or a plug-in's
# free ``kwargs`` kept: {floor: 1e-3} reached the reward as the text '1e-3', its first step an error.
_YAML12_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789"))


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes a text the loader above reads as a number (``name: '1e3'``), so that
    a run's config.yaml loads as it was written."""


_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789"))


#: The largest config file read (a config is kilobytes; prompt lists belong in a prompt file).
MAX_CONFIG_BYTES = 16 * 2**20
#: The most values a config may hold once its YAML aliases are expanded (a few anchors reused is
#: nothing; ten aliases nested nine deep, the "billion laughs", is 10^9).
MAX_CONFIG_VALUES = 1_000_000


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Values under ``node`` with every alias expanded (each node's count computed once)."""
    if id(node) not in sizes:
        sizes[id(node)] = 0  # a recursive node: PyYAML refuses it when it constructs it
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        sizes[id(node)] = min(1 + sum(_expanded_size(c, sizes) for c in children), MAX_CONFIG_VALUES + 1)
    return sizes[id(node)]


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error in one line: where, what, and what it was reading (``line 3, column 1:
    expected ',' or ']', but got '<stream end>' (while parsing a flow sequence at line 2, column
    7)``), without its quoted snippet of the text."""
    if not isinstance(e, yaml.MarkedYAMLError) or not e.problem:
        return " ".join(str(e).split())

    def at(mark: Any) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    out = f"{at(e.problem_mark)}: {e.problem}" if e.problem_mark else e.problem
    if e.context:
        same = e.context_mark is None or (
            e.problem_mark is not None
            and (e.context_mark.line, e.context_mark.column) == (e.problem_mark.line, e.problem_mark.column)
        )
        out += f" ({e.context}{'' if same else ' at ' + at(e.context_mark)})"
    return out


def _parse_yaml(text: str, what: str) -> Any:
    """``text`` as YAML (strict keys, aliases expanded to at most MAX_CONFIG_VALUES values), or a
    ConfigError in one line that starts with ``what``."""
    try:
        loader = _StrictLoader(text)  # it checks the characters: a ReaderError here
        try:
            node = loader.get_single_node()
            if node is not None and _expanded_size(node, {}) > MAX_CONFIG_VALUES:
                raise ConfigError(f"{what} holds more than {MAX_CONFIG_VALUES:,} values once its aliases are expanded")
            return loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:
        raise ConfigError(f"{what} nests its lists or mappings too deeply") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    hint = ": is it a config? (long prompt lists belong in a prompt file)"
    try:
        text = read_capped(path, "config file", MAX_CONFIG_BYTES, hint).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    except ValueError as e:  # not a regular file, or too large
        raise ConfigError(str(e)) from None
    data = _parse_yaml(text, f"config file {path}")
    if data is None or data == {}:  # a run of the defaults (the digits demo), where the user meant a config
        raise ConfigError(f"config file {path} holds no settings (it is empty, or comments only)")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"config file {path}: section names must be strings, got {bad!r}")
    return data


def _union_tag(part: Any) -> bool:
    """Whether a part of an error's location is pydantic's name of a union's member
    ('constrained-int', "literal['auto']", 'int'), not a field, key or index."""
    return isinstance(part, str) and ("-" in part or "[" in part or part in ("int", "float", "str", "bool", "none"))


def format_validation_error(e: ValidationError) -> str:
    lines: dict[str, list[str]] = {}  # one line per field: a union's members' complaints joined
    got: dict[str, str] = {}
    for err in e.errors():
        loc = [p for p in err["loc"] if not _union_tag(p)]
        where = ".".join(str(p) for p in loc)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "value_error":  # our own validators name the value themselves
            msg = msg.removeprefix("Value error, ")
        elif "input" in err and err["type"] not in ("missing",):
            got[where] = f" (got {err['input']!r})"
        said = lines.setdefault(where, [])
        said.append(msg.removeprefix("Input should be ") if said and msg.startswith("Input should be ") else msg)
    out = [f"{w}: {' or '.join(m)}{got.get(w, '')}" if w else " ".join(m) for w, m in lines.items()]
    if len(out) == 1:  # one mistake: one line
        return f"invalid config: {out[0]}"
    return "invalid config:\n" + "\n".join(f"  {line}" for line in out)  # a whole-config check names its fields


def load_config(argv: list[str] | None = None, **overrides: Any) -> Config:
    """Build the config from ``argv`` (defaults < YAML from --config < flags) and ``overrides``.

    ``overrides`` are nested dicts set over the YAML as flags are, a section key by key and a
    field's value (a list or a mapping too) whole (used by tests and benches); flags still win
    over them. Raises ConfigError with a readable message; argparse exits on unknown flags.
    """
    argv = _with_values(list(sys.argv[1:] if argv is None else argv))
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", action="append", default=[])
    given: list[str] = pre.parse_known_args(argv)[0].config
    if len(given) > 1:
        raise ConfigError(f"--config given {len(given)} times ({', '.join(given)}): give one file")
    if given and not given[0].strip():  # Path("") is the current directory: 'is not a regular file'
        raise ConfigError("--config is blank (an unset variable in the command?): give a YAML file")
    files = [home(Path(f)) for f in given]
    argv, flagged = _structured_flags(argv)
    data: dict[str, Any] = _read_yaml(files[0]) if files else {}
    for path, value, _ in _fields([], overrides):
        _set_at(data, path, value)
    for path, value in flagged:
        _set_at(data, path, value)
    _check_sections(data, [path for path, _, _ in _fields([], overrides)] + [p for p, _ in flagged], argv)
    if files:
        data["config"] = files[0]
    try:
        return Config(_cli_parse_args=argv, **data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
    except SettingsError as e:
        why = str(e).removeprefix("error parsing CLI: ")
        raise ConfigError(f"invalid command line: {why} (--help lists every flag)") from None


def _with_values(argv: list[str]) -> list[str]:
    """``argv`` where every ``--flag`` has a value (``--flag=VALUE`` or ``--flag VALUE``): a yes/no
    field's flag given alone (``--overwrite``, ``--learner.progress``) is ``--flag=true``, as a
    command line's switch reads; any other flag alone is an error that names it (a section given
    alone, ``--rollout``, would otherwise be taken as the section's defaults, silently)."""
    out = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if not arg.startswith("--") or arg == "--help" or "=" in arg:
            continue
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            continue
        if _field_annotation(arg[2:].split(".")) is not bool:
            raise ConfigError(f"invalid command line: {arg} needs a value ({arg}=VALUE)")
        out[i] = f"{arg}=true"
    return out


class CommandLine(argparse.ArgumentParser):
    """An argparse parser whose mistakes are one line, as the config's are (``error: invalid
    command line: <what> (--help lists every flag)``, exit 2), not argparse's usage block first:
    the command-line tools' own flags (learner.evaluate, rollout.generate, rewards.http_server)."""

    #: whether it takes config flags after ``--`` (learner.evaluate): one given before is said so
    takes_config_flags = False

    def error(self, message: str) -> NoReturn:
        unknown = message.removeprefix("unrecognized arguments: ").split() if "unrecognized" in message else []
        flags = [a for a in unknown if a.startswith("--") and "." in a.partition("=")[0]]
        if self.takes_config_flags and flags:  # a config flag before '--' is argparse's unknown flag
            message += f"; config flags go after '--': {self.prog} ... -- {' '.join(flags)}"
        self.exit(2, f"error: invalid command line: {message} (--help lists every flag)\n")


def given_path(text: str) -> Path:
    """An argparse ``type``: a path that is not blank. ``Path("")`` is the current directory, so a
    flag given an unset variable (``--out "$OUT"``) would write there without a word."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is blank (an unset variable in the command?): give a path, '.' for here")
    return home(Path(text))


def int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer from ``minimum`` to ``maximum`` (argparse names the flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def positive_float(maximum: float) -> Callable[[str], float]:
    """An argparse ``type``: a number above 0 and at most ``maximum`` (nan and inf refused)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not 0 < value <= maximum:  # nan fails every comparison
            raise argparse.ArgumentTypeError(f"must be above 0 and at most {maximum:g}, got {text}")
        return value

    return parse


def ints_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], list[int]]:
    """An argparse ``type``: a comma-separated list of ``int_at_least`` integers, e.g. ``2,4,8``."""
    one = int_at_least(minimum, maximum)

    def parse(text: str) -> list[int]:
        return [one(part.strip()) for part in text.split(",")]

    return parse


def _joined(argv: list[str]) -> list[str]:
    """``argv`` with each ``--flag VALUE`` written ``--flag=VALUE`` (``_with_values`` has seen
    that every flag has its value)."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--":
            return [*out, arg, *args]
        out.append(f"{arg}={next(args)}" if arg.startswith("--") and arg != "--help" and "=" not in arg else arg)
    return out


def _field_annotation(path: list[str]) -> Any:
    """The type of the field at ``path`` of the config (a section's model for a section; the
    config itself for ``[]``), or None where there is no such field (pydantic-settings names it).
    An optional field's type is its type without None: an optional section is a section."""
    model: Any = Config
    for part in path:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = field.annotation
        if typing.get_origin(model) in (Union, UnionType):
            args = [t for t in typing.get_args(model) if t is not type(None)]
            models = [t for t in args if isinstance(t, type) and issubclass(t, BaseModel)]
            model = models[0] if models else args[0] if len(args) == 1 else model
    return model


def _field_kind(path: list[str]) -> str | None:
    """What the field at ``path`` is: "section" (a model, which a flag's mapping merges into, as
    its dotted flags would), "value" (anything else, which a flag's value replaces) or None (no
    such field: pydantic-settings names it)."""
    kind = _field_annotation(path)
    if kind is None:
        return None
    return "section" if isinstance(kind, type) and issubclass(kind, BaseModel) else "value"


def _structured_flags(argv: list[str]) -> tuple[list[str], list[tuple[list[str], Any]]]:
    """Take the flags that give a list or a mapping (``--rollout.k_schedule={5000: 32}``,
    ``--rewards=[{name: hps}]``, ``--rollout.k_schedule={}``) out of ``argv``, each value read as
    the config file is read: YAML, so flow style or JSON (a list of texts given one bare text: that
    text, commas and all: a prompt). Each replaces what the file gives there,
    as a number given as a flag does; pydantic-settings would merge a mapping key by key into the
    file's (``{}`` would change nothing), read ``[]`` as a list of one empty string and refuse
    YAML. A mapping given for a section (``--rollout={k: 4}``) sets what it names, as the
    section's dotted flags would. The last flag that sets a field is the one that counts, as
    with any other flag: a dotted flag before a list or mapping that sets the same field is
    dropped (pydantic-settings' flags would otherwise win over it wherever they stood)."""
    rest: list[str] = []
    found: list[tuple[list[str], Any]] = []

    def sets(arg: str, at: list[Any]) -> bool:
        return arg.startswith("--") and arg.partition("=")[0][2:].split(".")[: len(at)] == list(map(str, at))

    for arg in _joined(argv):
        name, eq, text = arg.partition("=")
        path = name[2:].split(".")
        kind = _field_kind(path) if eq and name.startswith("--") else None
        annotation = _field_annotation(path) if kind == "value" else None
        if annotation == list[str] and not text.lstrip().startswith("["):
            # a list of texts (prompts) given one bare text: that text, whole; pydantic-settings
            # split it at its commas ('a red fox, oil painting' was two prompts)
            rest = [a for a in rest if not sets(a, path)]
            found.append((path, [text]))
            continue
        if typing.get_origin(annotation) is dict and not text.lstrip().startswith("{") and "=" not in text:
            example = "{3000: 8}" if typing.get_args(annotation)[0] is int else "{key: value}"
            raise ConfigError(  # pydantic-settings read it as key=value pairs: "not enough values to unpack"
                f"invalid command line: {name}={text!r}: give a mapping as in the file, e.g. {name}='{example}'"
                f" ({name}='{{}}' for none)"
            )
        if kind is None or not text.lstrip().startswith(("[", "{")):
            rest.append(arg)
            continue
        try:
            value = json.loads(text)
        except ValueError:
            value = _parse_yaml(text, f"invalid command line: the value of {name}")
        for at, sub, known in _fields(path, value):
            if known:
                rest = [a for a in rest if not sets(a, at)]
                found.append((at, sub))
            else:  # for pydantic-settings to name
                rest.append(f"--{'.'.join(map(str, at))}={json.dumps(sub, default=str)}")
    return rest, found


def _fields(path: list[Any], value: Any) -> Iterator[tuple[list[Any], Any, bool]]:
    """``value`` given for ``path``, as (path, value, whether it is a field) for each field it
    sets: a section's mapping (the whole config's, ``path=[]``) is taken key by key, as its
    dotted flags would be; a field's value, a list or a mapping included, is one value that
    replaces what was there."""
    kind = _field_kind(path)
    if kind == "section" and isinstance(value, dict):
        for key, sub in value.items():
            yield from _fields([*path, key], sub)
    else:
        yield path, value, kind is not None


def _check_sections(data: dict[str, Any], paths: list[list[str]], argv: list[str]) -> None:
    """A section the file gives as something else than a mapping (``sampler: toy``, or ``sampler:``
    with nothing under it) is an error whatever flags set fields in it: pydantic-settings merged a
    dotted flag's section over it (``--sampler.toy.dim=8`` made ``sampler: toy`` the default
    sampler, digits, without a word). A flag into a value that is no section (``--learner.lr.x``)
    is left for pydantic-settings to name."""
    dotted = [a.partition("=")[0][2:].split(".") for a in argv if a.startswith("--") and "." in a.partition("=")[0]]
    for path in [*paths, *dotted]:
        node: Any = data
        for depth, part in enumerate(path[:-1]):
            if not isinstance(node, dict) or part not in node:
                break
            node, at = node[part], path[: depth + 1]
            if isinstance(node, dict):
                continue
            if _field_kind(at) != "section" or (node is None and _takes_none(at)):
                break
            given = "nothing" if node is None else f"{node!r:.60}"
            raise ConfigError(
                f"invalid config: {'.'.join(at)}: a section of settings, given {given} (a mapping such as"
                f" {'.'.join(at)}: {{{path[depth + 1]}: ...}})"
            )


def _takes_none(path: list[str]) -> bool:
    """Whether the field at ``path`` may be None (an optional section: nothing given is its default)."""
    parent = _field_annotation(path[:-1])
    field = parent.model_fields.get(path[-1]) if isinstance(parent, type) and issubclass(parent, BaseModel) else None
    return field is not None and type(None) in typing.get_args(field.annotation)


def _set_at(data: dict[str, Any], path: list[str], value: Any) -> None:
    """``data[path[0]]...[path[-1]] = value``, making the sections on the way (one the file gave as
    something else is left for validation to name)."""
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return
    node[path[-1]] = value


def load_yaml_config(path: Path | str) -> Config:
    """Load and validate a YAML config file alone (no command line)."""
    return load_config(["--config", str(path)])
