"""Hydra sweeper plugin ``hydra/sweeper=runner`` (the default): Hydra's basic sweeper with a validation
that scales to big sweeps (see runner_sweeper.sweeper)."""
