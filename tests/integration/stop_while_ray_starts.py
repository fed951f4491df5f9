"""Run ``python -m learner.main`` as a user starts it, and send it SIGTERM or SIGINT (``argv[1]``:
TERM or INT) half-way through starting its own Ray cluster: right after Ray has started its
processes (the GCS, the raylet and its agents), before the driver connects to them. Used by
test_signals_at_start.py: ``python -m tests.integration.stop_while_ray_starts TERM <flags>``."""

from __future__ import annotations

import os
import runpy
import signal
import sys

from ray._private.node import Node

how = getattr(signal, f"SIG{sys.argv[1]}")
real = Node.start_ray_processes


def signalled_start_ray_processes(self):
    real(self)
    os.kill(os.getpid(), how)


Node.start_ray_processes = signalled_start_ray_processes
sys.argv = ["learner.main", *sys.argv[2:]]
runpy.run_module("learner.main", run_name="__main__", alter_sys=True)
