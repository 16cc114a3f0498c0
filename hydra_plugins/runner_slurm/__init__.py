"""Hydra launcher plugin ``hydra/launcher=slurm``: hydra-submitit-launcher's SLURM launcher with a sweep ledger
and detached submission (see runner_slurm.slurm_launcher)."""
