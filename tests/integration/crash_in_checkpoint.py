"""Run the learner and signal it while it writes checkpoint number ``argv[1]``: ``KILL`` (the
process dies for real, half-way through writing that checkpoint's manifest) or ``TERM`` (a job
stopped or a pod preempted: the run ends as it ends on Ctrl-C, before that manifest is written).
Used by test_resume.py: ``python -m tests.integration.crash_in_checkpoint N KILL|TERM <flags>``."""

from __future__ import annotations

import os
import signal
import sys

import common.checkpoint as ckpt

target, how = int(sys.argv[1]), getattr(signal, f"SIG{sys.argv[2]}")
real = ckpt.write_manifest
calls = {"n": 0}


def dying_write_manifest(directory):
    calls["n"] += 1
    if calls["n"] == target:
        if how == signal.SIGKILL:
            (directory / "manifest.json").write_text('{"policy/model.safet')  # torn write
        os.kill(os.getpid(), how)
    real(directory)


ckpt.write_manifest = dying_write_manifest

from learner.main import main  # noqa: E402

sys.exit(main(sys.argv[3:]))
