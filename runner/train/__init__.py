"""Training: the loop (how to step, evaluate, log and when to save), data, optimizers and schedules, metric
sinks. Nothing here imports hydra, fsspec (but lazily, for image folders at a URL) or TensorBoard (but lazily,
on rank 0)."""
