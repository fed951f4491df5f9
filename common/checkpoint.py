"""Checkpoint I/O: written atomically, verified on load.

A checkpoint is a directory ``ckpt-<iteration>`` holding the policy (safetensors, via
``save_pretrained``), the optimizer state, ``state.json`` (iteration, policy version, prompt
cursor, ...), the RNG states and a ``manifest.json`` of every file's size and sha256; ``extra``
tensors (one step off policy: the behaviour weights the next rollouts are drawn under) go into
``<name>.safetensors``. It is written into a temporary sibling, every file fsynced, then renamed
into place; the ``latest`` marker is written last (also by rename). Loading checks the manifest:
a damaged checkpoint is reported and skipped in favour of the previous one. The last ``keep``
checkpoints are kept.
``CheckpointStore`` puts the same layout on a local path or an fsspec URL (shared storage).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
LATEST = "latest"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file, or a directory's entries) to the disk: what a crash of the machine,
    not only of the process, keeps."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """``path`` holds ``text`` whole or its earlier content, whatever stops the write (a temporary
    ``.<name>.tmp-<pid>``, fsynced, renamed over it)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def replace_dir(made: Path, final: Path) -> None:
    """Put the directory ``made`` (written whole, beside ``final``) in ``final``'s place: its files
    fsynced, an earlier ``final`` renamed away first and removed after. ``final`` is never a
    part-written directory: the old one, the new one, or, for the moment between two renames,
    none (the old one then waits as ``.<name>.old-<pid>``, which a claim of the run dir removes)."""
    for p in made.rglob("*"):
        if p.is_file():
            fsync_path(p)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)  # a crash's leftover under a pid used again
    if final.exists():
        os.replace(final, old)
    os.replace(made, final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_manifest(directory: Path) -> None:
    """Record every file's size and sha256 in ``directory/manifest.json``; fsync files and dirs."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    for p in [*files, directory / MANIFEST]:
        fsync_path(p)
    for d in {p.parent for p in files} | {directory}:
        fsync_path(d)


def _out_of_space(root: Path) -> bool:
    """Whether the filesystem of ``root`` is full (less than a MiB free)."""
    try:
        return shutil.disk_usage(root).free < 2**20
    except OSError:
        return False


def checkpoint_name(iteration: int) -> str:
    return f"ckpt-{iteration:08d}"


def save_checkpoint(
    root: Path,
    iteration: int,
    policy: Any,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 3,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write checkpoint ``iteration`` under ``root`` atomically; return its directory. ``extra``:
    named sets of tensors written beside the policy (``load_tensors`` reads one back)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(iteration)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        policy.save_pretrained(tmp / "policy")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
        if extra:
            from safetensors.torch import save_file

            for name, tensors in extra.items():
                own = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}  # no shared storage
                save_file(own, tmp / f"{name}.safetensors")
        write_manifest(tmp)
    except Exception as e:
        full = not isinstance(e, OSError) and _out_of_space(root)  # torch says "unexpected pos" when it is
        shutil.rmtree(tmp, ignore_errors=True)  # what it wrote, freed: the checkpoints before it stay whole
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from e
        raise
    if final.exists():  # a re-run of the same iteration after a resume replaces it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(root)
    write_atomic(root / LATEST, final.name + "\n")
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint directories, oldest first (temporaries excluded)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("ckpt-"))


def verify(ckpt: Path) -> str | None:
    """None if every file of the manifest is there with its size and hash, else what is wrong."""
    mpath = ckpt / MANIFEST
    if mpath.exists() and not mpath.is_file():  # a FIFO: reading it waits for a writer, forever
        return f"unreadable manifest ({MANIFEST} is not a regular file)"
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({e})"
    entry = {"bytes": int, "sha256": str}
    if not isinstance(manifest, dict) or not all(
        isinstance(meta, dict) and all(isinstance(meta.get(k), t) for k, t in entry.items())
        for meta in manifest.values()
    ):
        return "a manifest that is not a file -> {bytes, sha256} mapping"
    for rel, meta in manifest.items():
        p = ckpt / rel
        if not p.is_file():
            return f"missing {rel}"
        if p.stat().st_size != meta["bytes"]:
            return f"{rel} has {p.stat().st_size} bytes, the manifest says {meta['bytes']}"
        if _sha256(p) != meta["sha256"]:
            return f"{rel} does not match its hash"
    return None


def find_latest(root: Path, log=print) -> Path | None:
    """The newest checkpoint that verifies; damaged ones are reported and skipped."""
    for ckpt in reversed(list_checkpoints(root)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        log(f"checkpoint {ckpt} is damaged ({problem}); trying the previous one")
    return None


def _lines(e: BaseException, start: int, stop: int) -> str:
    """Lines ``start:stop`` of an error's message (blank ones skipped), as one line of at most
    300 characters: torch's ``load_state_dict`` error is a heading, then a line per mismatch."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return " ".join(lines[start:stop])[:300]


def load_checkpoint(ckpt: Path, policy: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore weights (and optimizer, RNG) from ``ckpt``; return its state dict."""
    problem = verify(ckpt)
    if problem is not None:
        raise ValueError(f"checkpoint {ckpt} is damaged: {problem}")
    from safetensors.torch import load_file

    try:
        policy.load_state_dict(load_file(ckpt / "policy" / "model.safetensors"))
    except RuntimeError as e:  # another policy's shapes: torch's message, one line of it
        from common.config import ConfigError

        raise ConfigError(f"checkpoint {ckpt} holds another policy's weights: {_lines(e, 1, 2)}") from None
    if optimizer is not None:
        # onto the CPU first: a GPU learner's moments are CUDA tensors (its device index, which a
        # resume on a CPU host or another GPU lacks); load_state_dict moves them to the parameters'
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    torch.set_rng_state(torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True)["torch"])
    return json.loads((ckpt / "state.json").read_text())


def check_policy_fits(ckpt: Path, policy_kwargs: dict[str, Any]) -> None:
    """A ConfigError, as ``load_checkpoint`` words it, where the weights of ``ckpt`` do not fit the
    policy that ``policy_kwargs`` build: found before anything is trained or written (a sampler
    setting that changes the policy's inputs, the toy's token_dim or an SD model of another
    family, is no field of the config's own that a resume compares). Read from the file's header
    and a policy built on the meta device: no weights are loaded or allocated."""
    from safetensors import safe_open

    from common.policy import SchedulePolicy

    with torch.device("meta"):
        wanted = {k: tuple(v.shape) for k, v in SchedulePolicy(**policy_kwargs).state_dict().items()}
    with safe_open(str(ckpt / "policy" / "model.safetensors"), framework="pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - a safetensors handle
    if saved != wanted:
        from common.config import ConfigError

        shapes = [
            f"{k} of shape {saved[k]} where this policy has {wanted[k]}"
            for k in wanted
            if saved.get(k, wanted[k]) != wanted[k]
        ]
        names = [f"{k} not in this policy" for k in sorted(set(saved) - set(wanted))]
        names += [f"no {k}" for k in sorted(set(wanted) - set(saved))]
        differ = shapes + names
        why = f"{len(differ)} of its tensors differ, e.g. {differ[0]}" if len(differ) > 1 else differ[0]
        raise ConfigError(
            f"checkpoint {ckpt} holds another policy's weights ({why}): a sampler setting that shapes the policy's"
            " inputs changed since (resume with the run's own sampler settings)"
        )


def load_tensors(ckpt: Path, name: str) -> dict[str, torch.Tensor] | None:
    """The ``extra`` tensors ``name`` of checkpoint ``ckpt`` (None if it has none)."""
    path = ckpt / f"{name}.safetensors"
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(path)


def storage(root: str | Path) -> tuple[Any, str]:
    """(the fsspec filesystem, the path in it) of a checkpoint root, a path or a URL; a ConfigError
    naming the root where its protocol is unknown or needs a package not installed (s3fs, gcsfs)."""
    import fsspec

    from common.config import ConfigError

    try:
        return fsspec.core.url_to_fs(str(root))
    except Exception as e:  # noqa: BLE001 - any filesystem's own refusal (zip:// of a dir, ftp:// of no host): one line
        why = " ".join(str(e).split()) or "cannot be opened"
        raise ConfigError(f"checkpoint storage {str(root)!r}: {type(e).__name__}: {why}") from None


class CheckpointStore:
    """Checkpoints under a local path or an fsspec URL (shared storage: ``s3://``, ``gs://``, ...).

    A local root uses the functions above. A remote root gets the same layout: each checkpoint is
    written and verified locally, uploaded under a temporary name, moved into place, and only then
    named in ``latest``; object stores have no atomic rename, so a half-moved checkpoint is caught
    by its manifest when loaded. Loading downloads a checkpoint into a local temporary directory.
    """

    def __init__(self, root: str | Path):
        from fsspec.implementations.local import LocalFileSystem

        self.fs, self.root = storage(root)
        self.local = isinstance(self.fs, LocalFileSystem)
        self._scratch = tempfile.TemporaryDirectory(prefix="steinsched-ckpt-")

    def __str__(self) -> str:
        return self.root if self.local else f"{self.fs.protocol}:{self.root}"

    def save(
        self,
        iteration: int,
        policy: Any,
        optimizer: torch.optim.Optimizer,
        state: dict[str, Any],
        keep: int,
        extra: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> str:
        if self.local:
            return str(save_checkpoint(Path(self.root), iteration, policy, optimizer, state, keep, extra))
        with tempfile.TemporaryDirectory() as tmp:
            local = save_checkpoint(Path(tmp), iteration, policy, optimizer, state, keep=1, extra=extra)
            staging = f"{self.root}/.{local.name}.tmp-{os.getpid()}"
            final = f"{self.root}/{local.name}"
            self.fs.put(str(local) + "/", staging, recursive=True)
            if self.fs.exists(final):
                self.fs.rm(final, recursive=True)
            self.fs.mv(staging, final, recursive=True)
            self.fs.pipe(f"{self.root}/{LATEST}", (local.name + "\n").encode())
        names = self.names()
        for old in names[:-keep]:
            self.fs.rm(f"{self.root}/{old}", recursive=True)
        return final

    def set_aside_after(self, name: str) -> str | None:
        """Move the checkpoints later than ``name`` into ``superseded-<time>/`` of the store, and
        name ``name`` in ``latest``: a resume from an earlier checkpoint starts another line of
        training from it, whose logs it trims there, and the later checkpoints of the line it left
        would otherwise be taken as the newest by ``--resume auto`` (their logs gone, refused) and
        kept over the new line's by the pruning, which keeps the highest names. Returns where
        they went (None: there were none)."""
        later = [n for n in self.names() if n > name]
        if not later:
            return None
        aside = f"{self.root}/superseded-{time.strftime('%Y%m%dT%H%M%S')}"
        self.fs.makedirs(aside, exist_ok=True)
        for n in later:
            self.fs.mv(f"{self.root}/{n}", f"{aside}/{n}", recursive=True)
        self.fs.pipe(f"{self.root}/{LATEST}", (name + "\n").encode())
        return aside

    def writer(self) -> Path | None:
        """The run dir that wrote the newest checkpoint here (its state.json's config), or None
        where there is none or it cannot be read."""
        for name in reversed(self.names()):
            try:
                experiment = json.loads(self.fs.cat(f"{self.root}/{name}/state.json"))["config"]["experiment"]
                return Path(experiment["output_dir"]) / experiment["name"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return None

    def clear(self) -> None:
        """Remove every checkpoint of the store, its ``latest``, the checkpoints a resume set aside
        and the temporaries of uploads cut short (``--overwrite``; ``clean`` keeps the checkpoints)."""
        for path in self._entries():
            name = path.rsplit("/", 1)[-1]
            if name.startswith(("ckpt-", "superseded-")) or name == LATEST:
                self.fs.rm(path, recursive=True)
        self.clean()

    def clean(self) -> None:
        """Remove the temporaries of uploads cut short (``.ckpt-*.tmp-<pid>``: a learner that died
        while it uploaded a checkpoint leaves its staging copy) and of lock checks (a
        ``.lease-probe-*`` that a run killed while it timed a lock left)."""
        for path in self._entries():
            name = path.rsplit("/", 1)[-1]
            if ".tmp-" in name or name.startswith(".lease-probe-"):
                with contextlib.suppress(FileNotFoundError):  # its writer removed it meanwhile
                    self.fs.rm(path, recursive=True)

    def _entries(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        return [p.rstrip("/") for p in self.fs.ls(self.root, detail=False)]

    def names(self) -> list[str]:
        """The names of the checkpoints in the store (ckpt-<iteration>), oldest first."""
        if not self.fs.exists(self.root):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        return sorted(n for n in names if n.startswith("ckpt-"))

    def latest(self, log=print) -> Path | None:
        """A local, verified copy of the newest good checkpoint (damaged ones reported, skipped)."""
        if self.local:
            return find_latest(Path(self.root), log)
        for name in reversed(self.names()):
            local = self.fetch(f"{self.root}/{name}")
            problem = verify(local)
            if problem is None:
                return local
            log(f"checkpoint {self}/{name} is damaged ({problem}); trying the previous one")
        return None

    def holds(self, path: str) -> bool:
        """Whether the checkpoint ``path`` (a path or a URL) is one of this store's."""
        fs, where = storage(path)
        parent = where.rstrip("/").rsplit("/", 1)[0]
        if type(fs) is not type(self.fs):
            return False
        return Path(parent).resolve() == Path(self.root).resolve() if self.local else parent == self.root.rstrip("/")

    @classmethod
    def containing(cls, path: str) -> CheckpointStore:
        """The store the checkpoint ``path`` (a path or a URL) lies in."""
        fs, where = storage(path)
        return cls(fs.unstrip_protocol(where.rstrip("/").rsplit("/", 1)[0]))

    def fetch(self, path: str) -> Path:
        """A local copy of the checkpoint directory ``path`` (itself when the store is local)."""
        if self.local:
            return Path(storage(path)[1])  # a file:// URL too
        dest = Path(self._scratch.name) / path.rstrip("/").rsplit("/", 1)[-1]
        shutil.rmtree(dest, ignore_errors=True)
        self.fs.get(path.rstrip("/") + "/", str(dest) + "/", recursive=True)
        return dest


def load_run_config(run: Path, overrides: list[str] | None = None) -> Any:
    """A run's config (``<run>/config.yaml``), ``overrides`` (command-line flags) over it; a
    ConfigError naming the run's file where that file is the problem."""
    from common.config import ConfigError, load_config

    path = run / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run} is not a run directory (no config.yaml)")
    try:
        if not path.read_text(encoding="utf-8", errors="replace").strip():  # else read as the defaults
            raise ConfigError("it is empty")
        cfg = load_config(["--config", str(path)])
    except ConfigError as e:  # a run writes every field: this one was damaged or edited
        raise ConfigError(f"the run's config {path}: {e}") from None
    return load_config(["--config", str(path), *overrides]) if overrides else cfg


def load_run_policy(run: Path, checkpoint: str | None = None) -> Any:
    """A run's final policy (``<run>/policy``), or the weights of one of its checkpoints
    (``checkpoint``: 'latest', a name such as 'ckpt-00000300', or a path); a ConfigError naming
    what is missing or cannot be read otherwise."""
    from common.config import ConfigError

    cfg = load_run_config(run)
    if checkpoint is None and (run / "policy").is_dir():
        return _for_backend(read_policy(run / "policy"), run / "policy", cfg.sampler.backend)
    store = CheckpointStore(cfg.learner.checkpoint_dir or run / "checkpoints")
    if checkpoint is None:
        if store.names():
            raise ConfigError(f"{run} has no final policy yet (policy/): pass --checkpoint latest")
        raise ConfigError(f"{run} has no final policy (policy/) and no checkpoint in {store}")
    if checkpoint == "latest":
        ckpt = store.latest()
        if ckpt is None and store.names():  # each one damaged, said above
            raise ConfigError(f"no undamaged checkpoint in {store}: each of {', '.join(store.names())} is damaged")
    else:
        where = checkpoint if "/" in checkpoint else f"{str(store.root).rstrip('/')}/{checkpoint}"
        ckpt = store.fetch(where) if store.fs.isdir(where) else None
    if ckpt is None:
        relative = "/" in checkpoint and not checkpoint.startswith(("/", "."))
        hint = f" (a path is read from the current directory: give {run / checkpoint}?)" if relative else ""
        raise ConfigError(f"no checkpoint {checkpoint!r} in {store}{hint}")
    if not (Path(ckpt) / MANIFEST).exists() and not (Path(ckpt) / "state.json").exists():
        raise ConfigError(
            f"{ckpt} is not a checkpoint (it has no {MANIFEST} or state.json): --checkpoint takes 'latest', a"
            " checkpoint's name (ckpt-00000300) or its directory"
        )
    problem = verify(Path(ckpt))
    if problem is not None:
        raise ConfigError(f"checkpoint {ckpt} is damaged ({problem})")
    _check_of_run(Path(ckpt), run, cfg)
    return _for_backend(read_policy(Path(ckpt) / "policy", Path(ckpt)), Path(ckpt), cfg.sampler.backend)


def _check_of_run(ckpt: Path, run: Path, cfg: Any) -> None:
    """A ConfigError where the checkpoint ``ckpt`` is not one of the policy ``run`` trained: its
    global baseline's (whose weights the workers' policy would not take, after Ray started), or
    another run's (evaluated, silently, as this run's and logged into its TensorBoard)."""
    from common.config import ConfigError, resume_conflicts

    saved = json.loads((ckpt / "state.json").read_text()).get("config")
    if saved is None:  # written by hand, or before checkpoints recorded their config: nothing to compare
        return
    differs = [c for c in resume_conflicts(saved, cfg) if c.startswith(("experiment.", "policy.", "sampler"))]
    if differs:
        raise ConfigError(
            f"checkpoint {ckpt} is not of the policy {run} trained (its config differs in {', '.join(differs)}):"
            f" give --run the run it is of"
        )


def _for_backend(policy: Any, where: Path, backend: str) -> Any:
    """``policy``, or a ConfigError where it was trained for another built-in backend than the
    run's (a checkpoint of another run: its noise has another shape, and the sampler would fail
    on it after the workers started)."""
    from common.config import BUILTIN_BACKENDS, ConfigError

    trained = getattr(policy, "backbone", None)
    if trained in BUILTIN_BACKENDS and backend in BUILTIN_BACKENDS and trained != backend:
        raise ConfigError(
            f"the policy in {where} was trained for the {trained} backend; this run samples with {backend}"
        )
    return policy


def read_policy(directory: Path, checkpoint: Path | None = None) -> Any:
    """The policy saved in ``directory`` (and the weights of ``checkpoint`` loaded into it), in
    eval mode; a ConfigError naming the directory where its files cannot be read."""
    from common.config import ConfigError
    from common.policy import SchedulePolicy

    if not (directory / "config.json").is_file():  # the hub mixin would say so, then fail on the missing arguments
        raise ConfigError(f"the policy in {directory} cannot be loaded: its config.json is missing")
    weights = directory / "model.safetensors"
    if weights.exists() and not weights.is_file():  # a FIFO: safetensors waits on it, deaf to SIGTERM
        raise ConfigError(f"the policy in {directory} cannot be loaded: its model.safetensors is not a regular file")
    try:
        policy = SchedulePolicy.from_pretrained(directory).eval()
        if checkpoint is not None:
            load_checkpoint(checkpoint, policy, None)
    except Exception as e:  # noqa: BLE001 - whatever a damaged file raises, one line naming it
        why = _lines(e, 0, 2)  # a state dict's mismatch names itself on its second line
        raise ConfigError(f"the policy in {directory} cannot be loaded ({type(e).__name__}: {why})") from None
    return policy
