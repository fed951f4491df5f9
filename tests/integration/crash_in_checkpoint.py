"""Run the learner and SIGKILL it while it writes checkpoint number ``argv[1]`` (the process dies
for real, half-way through writing that checkpoint's manifest). Used by test_resume.py."""

from __future__ import annotations

import os
import signal
import sys

import common.checkpoint as ckpt

target = int(sys.argv[1])
real = ckpt.write_manifest
calls = {"n": 0}


def dying_write_manifest(directory):
    calls["n"] += 1
    if calls["n"] == target:
        (directory / "manifest.json").write_text('{"policy/model.safet')  # torn write
        os.kill(os.getpid(), signal.SIGKILL)
    real(directory)


ckpt.write_manifest = dying_write_manifest

from learner.main import main  # noqa: E402

sys.exit(main(sys.argv[2:]))
