"""Mirroring a run directory to its remote home in the background (syncer), deciding what changed (diff) and
bounding the remote's checkpoints (retention)."""
