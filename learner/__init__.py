"""The learner: entry point, training loop, baselines, update, evaluation, metrics."""
