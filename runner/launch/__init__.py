"""Launching concerns that are not the training loop: requeue-on-preemption and the local device pool."""
