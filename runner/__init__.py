"""runner: a Hydra-configured experiment runner for PyTorch training."""

__version__ = "0.1.0"
