"""Run ``python -m learner.evaluate`` and send it SIGTERM (an evaluation job stopped) as its first
schedule is evaluated, its actors and the Ray cluster it started up. Used by test_take_home.py:
``python -m tests.integration.term_in_evaluate <learner.evaluate arguments>``."""

from __future__ import annotations

import os
import signal
import sys

import learner.evaluate as ev

real = ev.evaluate


def terminated_evaluate(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)


ev.evaluate = terminated_evaluate
sys.exit(ev.main(sys.argv[1:]))
