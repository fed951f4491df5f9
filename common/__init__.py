"""Shared pieces: config, schedule maths, policy network, messages, codec, checkpoint I/O."""
