"""Checksums computed while DCP writes must equal a re-read of the files."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from runner.checkpoint.hashing import HashingWriter
from runner.storage import checksum


def test_digests_while_writing_match_the_files(tmp_path: Path) -> None:
    tensors = {"model": {f"w{i}": torch.randn(64, 33 + i) for i in range(7)}, "optim": {"m": torch.arange(10)}}
    writer = HashingWriter(str(tmp_path), thread_count=2, sync_files=False)
    dcp.save(tensors, storage_writer=writer)
    names = sorted(os.listdir(tmp_path))
    assert ".metadata" in names and any(n.endswith(".distcp") for n in names)
    for name in names:
        full = str(tmp_path / name)
        assert writer.checksum(full) == checksum.of_file(full, checksum.MANIFEST_ALGORITHM), name
    assert writer.checksum(str(tmp_path / "not-written-here")) is None
