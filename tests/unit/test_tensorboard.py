"""The TensorBoard logger: a step's scalars as one event, every value read back under its tag
and step (a non-finite one too), and figures in the Images tab."""

from __future__ import annotations

import math
import time

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402

from learner.metrics import TensorBoardLogger  # noqa: E402


def test_a_step_is_one_event_and_every_value_reads_back(tmp_path):
    rows = {step: {f"group/m{i}": step + i / 10 for i in range(40)} | {"x/nan": math.nan} for step in (1, 2, 5)}
    with TensorBoardLogger(tmp_path) as tb:
        for step, row in rows.items():
            tb.log(step, row)
        fig, ax = plt.subplots(figsize=(2, 1))
        ax.plot([0, 1], [1, 0])
        tb.figure("pictures/schedules", fig, 5)
        plt.close(fig)
    (events,) = tmp_path.glob("events.out.tfevents.*")
    with_values = [e for e in EventFileLoader(str(events)).Load() if e.HasField("summary")]
    assert [e.step for e in with_values] == [1, 2, 5, 5]  # three rows and one figure
    assert [len(e.summary.value) for e in with_values] == [41, 41, 41, 1]

    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert len(acc.Tags()["scalars"]) == 41
    for tag in ("group/m0", "group/m7", "group/m39"):
        got = [(s.step, s.value) for s in acc.Scalars(tag)]
        want = [(step, row[tag]) for step, row in rows.items()]
        assert [g[0] for g in got] == [w[0] for w in want]
        assert all(math.isclose(g[1], w[1], rel_tol=1e-6) for g, w in zip(got, want, strict=True))  # float32
    assert all(math.isnan(s.value) for s in acc.Scalars("x/nan"))
    (image,) = acc.Images("pictures/schedules")
    assert (image.step, image.width, image.height) == (5, 200, 100)  # 2 x 1 inches at 100 dpi


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # pytest's catch of a thread's error
def test_a_storage_error_of_the_logs_names_the_file_and_is_no_thread_traceback(tmp_path, capfd):
    """A disk full or gone read-only under the logs: the run's line said "storage failed" (no file:
    a file object's write names none), after TensorBoard's writer thread printed a 16-line
    traceback; the error names the file, and is raised once, in the learner."""
    import errno

    from learner.metrics import JsonlLogger

    jsonl = JsonlLogger(tmp_path / "metrics.jsonl")

    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    jsonl._f.close()
    jsonl._f = Full()
    with pytest.raises(OSError, match="No space left") as e:
        jsonl.log(1, {"x": 1.0})
    assert e.value.filename == str(tmp_path / "metrics.jsonl")

    tb = TensorBoardLogger(tmp_path / "tb")

    def read_only(data):
        raise OSError(errno.EROFS, "Read-only file system")

    tb._w.event_writer._async_writer._writer.write = read_only  # what the writer thread calls
    with pytest.raises(OSError, match="Read-only file system") as e:
        for step in range(200):
            tb.log(step, {"x": 1.0})
            time.sleep(0.01)
    assert e.value.filename == tb.path and tb.path.startswith(str(tmp_path / "tb"))
    assert "Traceback" not in capfd.readouterr().err

    # an error in the last writes before the close (the final row, the figures): the close raises it
    last = TensorBoardLogger(tmp_path / "tb2")
    last._w.event_writer._async_writer._writer.write = read_only
    last.log(0, {"x": 1.0})
    time.sleep(0.3)  # the writer thread has met it
    with pytest.raises(OSError, match="Read-only file system") as e:
        last.close()
    assert e.value.filename == last.path
    assert "Traceback" not in capfd.readouterr().err
