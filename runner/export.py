"""``python -m runner.export <checkpoint dir or URL> <out> [--format safetensors|pt]``: a checkpoint's model
weights as one standard file.

A runner checkpoint is a DCP folder (possibly sharded over many ranks) plus a manifest; reading it needs
runner or DCP. The export is one file anything can read: safetensors (default) or a plain ``torch.save``\\ d
state dict (``--format pt``, loadable with ``torch.load(..., weights_only=True)``). It works from a checkpoint
of any world size, DDP or FSDP, without a process group: the shards are joined in this one process. The
checkpoint is verified against its manifest first (every file's size and checksum); a remote one is
downloaded and verified the same way a resume does. Keys are the model's own (``model.`` stripped), so::

    model = VisionTransformer(...)   # built as in the run's .hydra/config.yaml
    model.load_state_dict(safetensors.torch.load_file("model.safetensors"))

The file is written to ``<out>.tmp`` and renamed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from typing import Any

from runner.checkpoint.errors import CheckpointError
from runner.checkpoint.layout import MANIFEST
from runner.checkpoint.manifest import CheckpointRef, ref_at
from runner.storage import LocalStorage, StorageSettings
from runner.storage.s3 import S3Connection

FORMATS = ("safetensors", "pt")
_PREFIX = "model."


class ExportError(ValueError):
    """Bad input to the export: reported as one line, exit 2."""


def _locate(source: str, endpoint_url: str) -> CheckpointRef:
    """The checkpoint at ``source`` (a folder or URL of ``step_<N>``), checked against its manifest."""
    target = source.rstrip("/")
    if "://" not in target:
        target = os.path.abspath(target)
    parent, _, name = target.rpartition("/")
    storage = StorageSettings(s3=S3Connection(endpoint_url=endpoint_url)).open_url(parent)
    # NOTE: a local checkpoint is verified in full here; a remote one by structure, then in full once
    # downloaded (as a resume does).
    return ref_at(storage, name, checksums=isinstance(storage, LocalStorage), named="")


def read_model(ref: CheckpointRef, scratch: str) -> dict[str, Any]:
    """The model tensors of ``ref`` by their module keys, whole; a remote ``ref`` is downloaded to ``scratch``."""
    from runner.checkpoint.load import read_tensors
    from runner.checkpoint.resume import download

    folder = ref.url
    if not isinstance(ref.storage, LocalStorage):
        folder = os.path.join(scratch, os.path.basename(ref.path))
        download(ref, folder)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        tensors = read_tensors(folder, prefix=_PREFIX)
    if not tensors:
        raise CheckpointError(f"{ref.source} holds no model tensors (no '{_PREFIX}*' entries)")
    return {key[len(_PREFIX) :]: value for key, value in tensors.items()}


def write(tensors: dict[str, Any], out: str, fmt: str, metadata: dict[str, str]) -> None:
    """``tensors`` to ``out`` in ``fmt``, atomically (``<out>.tmp``, then a rename)."""
    import torch

    tmp = f"{out}.tmp"
    try:
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        else:
            torch.save(tensors, tmp)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def export(source: str, out: str, fmt: str = "safetensors", endpoint_url: str = "") -> str:
    """Export the model weights of the checkpoint at ``source`` to ``out``; returns a one-line summary."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: unknown format; choose one of {', '.join(FORMATS)}")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ExportError(f"{out}: the folder {folder} does not exist; create it or choose another output path")
    ref = _locate(source, endpoint_url)
    with tempfile.TemporaryDirectory(prefix="runner-export-") as scratch:
        tensors = read_model(ref, scratch)
    manifest = ref.manifest
    metadata = {
        "format": "runner model weights",
        "step": str(ref.step),
        "source": ref.source,
        "config_hash": str(manifest.get("config_hash", "")),
        "saved_world_size": str(manifest.get("world_size", "")),
        "versions": json.dumps(manifest.get("versions", {})),
    }
    write(tensors, out, fmt, metadata)
    params = sum(t.numel() for t in tensors.values())
    return (
        f"exported {len(tensors)} tensors ({params / 1e6:.2f}M parameters) of step {ref.step} from {ref.source} "
        f"to {out} ({fmt}, {os.path.getsize(out) / 1e6:.1f} MB)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runner.export",
        description="Write a runner checkpoint's model weights as one standard file (verified against its "
        "manifest first).",
    )
    parser.add_argument("checkpoint", help=f"a checkpoint folder (…/checkpoints/step_<N>, holding {MANIFEST}) or URL")
    parser.add_argument("out", help="the file to write, e.g. model.safetensors")
    parser.add_argument("--format", default="safetensors", choices=FORMATS, help="safetensors (default) or pt")
    parser.add_argument("--endpoint-url", default="", help="S3-compatible endpoint for an s3:// checkpoint")
    args = parser.parse_args(argv)
    try:
        print(export(args.checkpoint, args.out, args.format, args.endpoint_url))
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
