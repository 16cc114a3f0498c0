"""Checkpoints: what one holds (state), where it lives (layout), what makes it one (manifest), writing it
(save, async_save, hashing), loading it safely in one pass (load), finding where a run continues from and
downloading it (resume), and retiring old ones (retention)."""
