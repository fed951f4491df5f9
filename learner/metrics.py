"""Metric loggers: JSONL in the run directory and TensorBoard. Only the learner logs."""

from __future__ import annotations

import json
import math
import threading
import weakref
from pathlib import Path
from typing import Any, Protocol

from common.codec import naming

#: the writer threads of this program's TensorBoard loggers (a user's own SummaryWriter's are not)
_WRITER_THREADS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


def _quiet_writer_thread(thread: threading.Thread | None) -> None:
    """TensorBoard writes its events from a thread of its own, which prints the traceback of a
    storage error (a disk full or gone read-only) before the writer's next call, or its close,
    raises it again in the learner, where the run stops on it in one line: that thread's OSErrors
    are left to that call. The hook is installed once per process, over the one before it."""
    if thread is None:
        return
    _WRITER_THREADS.add(thread)
    previous = threading.excepthook
    if getattr(previous, "quiets_writers", False):
        return

    def hook(args: Any) -> None:
        if not (args.thread in _WRITER_THREADS and isinstance(args.exc_value, OSError)):
            previous(args)

    hook.quiets_writers = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class MetricLogger(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "a", buffering=1)  # noqa: SIM115 - open for the run's life, closed by close()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
        with naming(self.path):
            self._f.write(json.dumps({"step": step, **clean}) + "\n")

    def close(self) -> None:
        with naming(self.path):
            self._f.close()


class TensorBoardLogger:
    """Scalars and figures in a TensorBoard event file. A step's scalars go out as one event (one
    summary of many values): ``SummaryWriter.add_scalar`` writes an event per scalar, ten times
    the cost for a row of forty metrics, which the toy pays every few milliseconds."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard.writer import FileWriter

        self._w = FileWriter(str(log_dir))
        events = self._w.event_writer
        self.path = getattr(events, "_file_name", str(log_dir))  # the event file
        _quiet_writer_thread(getattr(getattr(events, "_async_writer", None), "_worker", None))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()]
        with naming(self.path):
            self._w.add_summary(Summary(value=values), step)

    def figure(self, tag: str, fig: Any, step: int) -> None:
        """A matplotlib figure as an image (the run's pictures, also in TensorBoard's Images tab)."""
        import numpy as np
        from torch.utils.tensorboard.summary import image

        fig.canvas.draw()
        rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
        with naming(self.path):
            self._w.add_summary(image(tag, rgb, dataformats="HWC"), step)

    def close(self) -> None:
        """Flushed first: the writer's close does not raise what its thread failed on, flush does."""
        with naming(self.path):
            try:
                self._w.flush()
            finally:
                self._w.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Loggers:
    def __init__(self, *loggers: MetricLogger):
        self.loggers = loggers

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for lg in self.loggers:
            lg.log(step, metrics)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


def scan_jsonl(path: Path) -> tuple[list[dict], int, int]:
    """(rows, bytes of the complete lines, bytes of a torn last line). A last line without its
    newline that does not parse (a crash mid-write) is torn, not an error; a bad line anywhere
    else raises ValueError naming its line number."""
    data = Path(path).read_bytes()
    rows, good = [], 0
    for n, line in enumerate(data.splitlines(keepends=True), 1):
        complete = line.endswith(b"\n")
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            if not complete:
                break
            raise ValueError(f"{path}: line {n} is not JSON: {line[:80]!r}") from None
        if row is not None and not (isinstance(row, dict) and isinstance(row.get("step"), int)):
            raise ValueError(f"{path}: line {n} is not a metrics row (no integer 'step')")
        if row is not None:
            rows.append(row)
        good += len(line)
    return rows, good, len(data) - good


def read_jsonl(path: Path) -> list[dict]:
    return scan_jsonl(path)[0]
