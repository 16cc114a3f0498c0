"""Hydra launcher plugin ``hydra/launcher=pool``: a local device pool (see runner.launch.pool)."""
