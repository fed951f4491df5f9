"""Generate with a trained run's schedule: ``python -m rollout.generate --run DIR --prompt "..." --seed 0``.

    python -m rollout.generate --run runs/digits --prompt "a handwritten seven" --seed 0 --out seven.png
    python -m rollout.generate --run runs/digits --prompt "the digit 3" --prompt "a 5" --seed 0 --seed 1 --compare
    python -m rollout.generate --run runs/digits --prompt "the digit 3" --seed 12345 --score

The run's own sampler (its config.yaml, built in this process) draws x_T from each seed exactly
as in training and evaluation; the policy (``<run>/policy``, or ``--checkpoint``) gives the
schedule of each (prompt, noise): its Dirichlet mean, or with ``--schedule global`` the run's
learned global schedule, or the backend's default. One prompt and seed: the image; several: a
grid (rows: schedules, columns: prompt x seed). ``--compare`` adds the default schedule beside.
``--score`` prints every configured reward of every image (the fidelity reward with its
many-step reference), which for a held-out (prompt, seed) is what ``python -m learner.evaluate``
reports for it. A backend without images (the toy) prints the samples.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from common.signals import how_stopped, loading

with loading(__name__):
    import numpy as np
    import torch

    from common.checkpoint import load_run_config, load_run_policy, read_policy
    from common.config import (
        DEFAULT_REFERENCE_STEPS,
        MAX_SEED,
        MAX_STEPS,
        CommandLine,
        ConfigError,
        given_path,
        int_at_least,
        reward_keys,
    )
    from common.policy import dirichlet_mean
    from common.schedule import times_from_tau
    from rollout.backends import build_sampler
    from rollout.sampler import policy_inputs, prompt_problem


def schedules_for(
    sampler: Any, policy: Any, prompts: list[str], noise: np.ndarray, which: str, steps: int, glob: Any = None
) -> np.ndarray:
    """[N, L+1] schedules of (prompts[i], noise[i]): 'learned' (the policy's Dirichlet mean),
    'global' (``glob``'s one schedule) or 'default'."""
    if which == "default":
        return np.tile(sampler.default_tau(steps), (len(prompts), 1))
    if which == "global":
        return np.tile(np.asarray(glob.global_mean_tau()), (len(prompts), 1))
    return dirichlet_mean(policy, policy_inputs(noise, sampler.encode(prompts)))


def reward_servers(cfg: Any) -> list[Any]:
    """Every configured reward, built here by the reward servers' own code (each once); a reward
    that cannot be built is a ConfigError in one line, found before anything is sampled."""
    from rewards.actors import RewardServer

    servers = []
    for key, spec in zip(reward_keys(cfg.rewards), cfg.rewards, strict=True):
        try:
            servers.append(RewardServer(spec.name, spec.kwargs, sampler=cfg.sampler.model_dump(mode="json")))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - its own __init__ failed (a model not there): one line, as a run says
            why = str(e) if isinstance(e, (ValueError, ImportError)) else f"{type(e).__name__}: {e}"
            raise ConfigError(f"--score: reward {key!r} could not start: {why}") from None
    return servers


def score(
    cfg: Any,
    sampler: Any,
    prompts: list[str],
    noise: np.ndarray,
    images: dict[str, np.ndarray],
    servers: list[Any] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Every configured reward of each schedule's ``images`` (``servers``, or each reward built
    here), and their weighted total as 'reward'. The many-step reference, for a reward that
    compares with it, is made once for all schedules."""
    servers = reward_servers(cfg) if servers is None else servers
    references = None
    if any(server.needs_reference() for server in servers):
        n = cfg.rollout.reference_steps or DEFAULT_REFERENCE_STEPS
        references = sampler.sample(prompts, noise, np.tile(times_from_tau(sampler.default_tau(n)), (len(prompts), 1)))
    out: dict[str, dict[str, np.ndarray]] = {}
    keys = reward_keys(cfg.rewards)  # as the evaluation's columns: the same reward twice is two
    for name, imgs in images.items():
        got = {key: server.score(imgs, prompts, references) for key, server in zip(keys, servers, strict=True)}
        got["reward"] = sum(
            spec.weight * got[key].astype(np.float64) for key, spec in zip(keys, cfg.rewards, strict=True)
        )
        out[name] = got
    return out


def main(argv: list[str] | None = None) -> int:
    p = CommandLine(
        prog="python -m rollout.generate",
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", type=given_path, required=True, help="A run directory.")
    p.add_argument("--prompt", action="append", required=True, help="A prompt (repeat for several).")
    p.add_argument(
        "--seed", type=int_at_least(0, MAX_SEED), action="append", help="A noise seed (repeat for several; default 0)."
    )
    p.add_argument(
        "--steps",
        type=int_at_least(1, MAX_STEPS),
        help="L (default: the policy's; another L runs the default schedule only).",
    )
    p.add_argument("--schedule", choices=["learned", "global", "default"], default="learned")
    p.add_argument("--checkpoint", help="'latest', a checkpoint name or path (default: the run's final policy).")
    p.add_argument("--compare", action="store_true", help="Also the default schedule, beside.")
    p.add_argument("--score", action="store_true", help="Print every configured reward of every image.")
    p.add_argument(
        "--out", type=given_path, help="PNG or JPEG to write (default: generated.png in the current directory)."
    )
    args = p.parse_args(argv)
    try:
        return _generate(args)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM
        word, code = how_stopped(e)
        print(f"{word}: nothing was written", file=sys.stderr)
        return code


def _generate(args: argparse.Namespace) -> int:
    out = args.out or Path("generated.png")
    try:
        check_image_path(out)
        cfg = load_run_config(args.run)
        policy = load_run_policy(args.run, args.checkpoint)
        steps = args.steps or policy.steps
        if args.schedule != "default" and steps != policy.steps:
            raise ConfigError(
                f"the policy of {args.run} was trained for L={policy.steps}; --steps {steps} runs only with"
                " --schedule default (or use a run trained at that L)"
            )
        glob = None
        if args.schedule == "global":
            if policy.variant == "global":
                glob = policy
            elif args.checkpoint is not None:  # it names a checkpoint of the run's own policy, not of global/
                raise ConfigError(
                    f"--checkpoint {args.checkpoint} is of the policy {args.run} trained; --schedule global uses its"
                    f" learned global schedule: give --run {args.run / 'global'} --checkpoint ... for one of that"
                    " schedule's checkpoints"
                )
            elif (args.run / "global" / "policy").is_dir():
                glob = read_policy(args.run / "global" / "policy")
            else:
                raise ConfigError(f"{args.run} has no learned global schedule (global/policy)")
        torch.set_num_threads(cfg.learner.torch_threads)
        sampler = build_sampler(cfg.sampler)
        problem = prompt_problem(sampler, args.prompt)
        if problem is not None:
            raise ConfigError(f"--prompt: {problem}")
        servers = reward_servers(cfg) if args.score else []  # a reward that cannot start: found before sampling
    except (ConfigError, ValueError, OSError) as e:  # OSError: a model the hub cannot give (common.hub), a file
        print(f"error: {e}", file=sys.stderr)
        return 2
    seeds = args.seed or [0]
    pairs = [(prompt, seed) for prompt in args.prompt for seed in seeds]
    prompts = [q for q, _ in pairs]
    noise = sampler.initial_noise([s for _, s in pairs])
    rows = {args.schedule: schedules_for(sampler, policy, prompts, noise, args.schedule, steps, glob)}
    if args.compare and args.schedule != "default":
        rows["default"] = schedules_for(sampler, policy, prompts, noise, "default", steps)
    images = {name: sampler.sample(prompts, noise, times_from_tau(tau)) for name, tau in rows.items()}
    for name, tau in rows.items():
        for (prompt, seed), t in zip(pairs, times_from_tau(tau), strict=True):
            print(f"{name:>8}  {prompt!r} seed {seed}: t = {np.array2string(t, precision=3)}")
    if np.asarray(next(iter(images.values()))).ndim < 3:  # not images (the toy's vectors)
        for name, imgs in images.items():
            print(f"{name} samples:\n{np.asarray(imgs)}")
        if args.out is not None:
            print(f"no image written to {args.out}: this backend's samples are vectors, printed above")
        written = None
    else:
        write_images(out, images, [f"{q} (seed {s})" for q, s in pairs])  # before scoring: a reward's failure keeps it
        print(f"wrote {out}")
        written = out
    if args.score:
        try:
            scored = score(cfg, sampler, prompts, noise, images, servers)
        except KeyboardInterrupt as e:  # the image is kept: stopped while it was scored
            if written is None:
                raise
            word, code = how_stopped(e)
            print(f"{word}: the image is in {written}, not scored", file=sys.stderr)
            return code
        except Exception as e:  # noqa: BLE001 - a reward that fails on these images: one line, what is kept
            kept = f"; the image is in {written}" if written is not None else ""
            print(f"error: --score: {type(e).__name__}: {e}{kept}", file=sys.stderr)
            return 1
        for name, got in scored.items():
            for i, (prompt, seed) in enumerate(pairs):
                cells = "  ".join(f"{k} {float(v[i])!r}" for k, v in got.items())
                print(f"score {name}  {prompt!r} seed {seed}: {cells}")
    return 0


#: The image files ``--out`` may name (what both PIL and matplotlib write).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def check_image_path(path: Path) -> None:
    """``path`` is an image file that can be written: a known suffix, in a directory that exists,
    a file this process can write there (found before anything is sampled)."""
    if path.is_dir():
        raise ConfigError(f"--out {path} is a directory; name an image file in it, e.g. {path / 'generated.png'}")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ConfigError(f"--out {path}: name a {', '.join(IMAGE_SUFFIXES)} file")
    if not path.parent.is_dir():
        raise ConfigError(f"--out {path}: the directory {path.parent} does not exist")
    if path.exists() and not path.is_file():  # a FIFO (opening it waits for a reader), a device
        raise ConfigError(f"--out {path} is not a regular file; name an image file")
    try:  # what writing it will need, tried now (a read-only place, /sys, /proc), touching nothing of the user's
        target = path.resolve()  # where the image goes: through a link, its target (a loop: RuntimeError)
        if target.exists():
            with open(target, "ab"):
                pass
        else:  # a file made and removed beside it (a link to nothing was removed, its target left empty)
            fd, probe = tempfile.mkstemp(prefix=".generate-probe-", dir=target.parent)
            os.close(fd)
            os.unlink(probe)
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"--out {path} cannot be written: {getattr(e, 'strerror', None) or e}") from None


def write_images(path: Path, images: dict[str, Any], captions: list[str]) -> None:
    """One image as it is (a grey image dark on light, as the run's samples.png draws it);
    several, or several schedules, as a captioned grid."""
    if len(images) == 1 and len(captions) == 1:
        from PIL import Image

        a = np.asarray(next(iter(images.values()))[0])
        if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 1):  # grey, e.g. the digits backend's
            grey = a.reshape(a.shape[0], a.shape[1])
            ink = grey / 255.0 if grey.dtype == np.uint8 else grey
            Image.fromarray(np.clip(np.round(255 * (1 - ink)), 0, 255).astype(np.uint8), mode="L").save(path)
            return
        from rewards.images import as_uint8_images

        Image.fromarray(as_uint8_images(a[None])[0]).save(path)
        return
    from learner.plots import plot_samples

    plot_samples(path, captions, {k: np.asarray(v) for k, v in images.items()})


if __name__ == "__main__":
    sys.exit(main())
