"""Rollout side: samplers (backends) and the RolloutWorker actor."""
