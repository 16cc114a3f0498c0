"""Checkpoint cost, ViT-B/16 + AdamW (about 1 GB), every method against a raw write measured in the same run.

    python bench/checkpoint.py [--rounds 3] [--dir DIR] [--json]

Per round, in a rotating order: a raw fsync'd write of the same bytes (one flat buffer), ``torch.save``,
our synchronous save (DCP + manifest with checksums computed while writing + rename), our async save as
``run`` sets it up, a raw read, our load (what ``run`` does to resume: find the newest checkpoint, load it
into the live model and optimizer, checking every byte against the manifest as it is read) and, for
comparison, DCP's stock ``FileSystemReader`` load (no checks), each after evicting the files from the page
cache the same way (fsync, then DONTNEED; ``mincore`` must then find no page cached, else the run stops),
in an order that rotates per round; each round's three reads are printed. The async stall is what the
training thread loses: the ``save`` call plus the wait at the fence before the next optimizer step, with
one real ViT-B/16 forward/backward (batch 2) in between; that step is also timed against one with no write in progress
(the cores are shared).
Buffers are touched before the timed rounds (first touch of fresh memory costs ~2 s/GiB on these VMs).
Figures are medians; ratios are medians of the per-round ratios. Also timed, as the profile behind
``save_vs_raw``: the DCP write alone, and a pass of the manifest's checksum (xxh3_128) and of sha256
(what manifests used before) over the same bytes.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from runner.checkpoint import layout, manifest, resume
from runner.checkpoint.load import SafeLoadPlanner
from runner.checkpoint.save import Checkpointer
from runner.checkpoint.state import TrainState
from runner.models.vit import VisionTransformer
from runner.storage import LocalStorage, checksum
from runner.train.data import SyntheticImages, TrainStream
from runner.train.optim import param_groups

warnings.filterwarnings("ignore", message="torch.distributed is disabled")
warnings.filterwarnings("ignore", message=".*process group.*")

TARGETS = {"save_vs_raw": (">=", 0.8), "async_stall_vs_sync": ("<=", 0.05), "load_vs_raw_read": (">=", 0.8)}


def vitb16_state() -> TrainState:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=224, patch_size=16, num_classes=1000, width=768, depth=12, heads=12)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
    for p in model.parameters():  # one optimizer step without a forward: materialises the AdamW moments
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    data = TrainStream(SyntheticImages(16, 224, 1000, 1.0, 0, 0), 2, 0)
    return TrainState(model, opt, data, step=1)


def payload_bytes(state: TrainState) -> int:
    tensors, _ = state.tensors_and_meta()
    return sum(t.numel() * t.element_size() for section in tensors.values() for t in section.values())


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(path: str) -> list[str]:
    return [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]


def resident_pages(path: str) -> int:
    """Pages of ``path`` (a file or a folder) in the page cache, by ``mincore`` on a read-only mapping."""
    pages = 0
    for f in _files(path):
        size = os.path.getsize(f)
        if size == 0:
            continue
        with open(f, "rb") as fh, mmap.mmap(fh.fileno(), size, prot=mmap.PROT_READ) as m:
            vec = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
            view = numpy.frombuffer(m, dtype=numpy.uint8)  # read-only: numpy gives its address, ctypes would not
            try:
                if _libc.mincore(view.ctypes.data, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore({f})")
            finally:
                del view
            pages += sum(v & 1 for v in vec)
    return pages


def evict(path: str) -> None:
    """Drop ``path``'s pages from the page cache, so the next read comes from the disk: fsync first (dirty
    pages cannot be dropped), then DONTNEED on every file; raises if any page stayed cached."""
    for f in _files(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if (left := resident_pages(path)) != 0:
        raise RuntimeError(f"{left} pages of {path} are still cached after eviction: the read would not be cold")


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


class Bench:
    def __init__(self, root: str) -> None:
        self.root = root
        self.state = vitb16_state()
        self.nbytes = payload_bytes(self.state)
        self.flat = torch.empty(self.nbytes, dtype=torch.uint8)
        self.flat.fill_(1)  # pre-touch
        self.read_buf = bytearray(self.nbytes)
        self.read_buf[:: 1 << 12] = b"\x01" * len(self.read_buf[:: 1 << 12])  # pre-touch
        self.async_ckpt = Checkpointer(os.path.join(root, "async"), keep_latest_k=1, config_hash="bench")
        self.async_ckpt.enable_async(defer_copy=True)  # as run() sets it up
        self.images = torch.randn(2, 3, 224, 224)
        self.labels = torch.randint(1000, (2,))
        self.raw_file = os.path.join(root, "raw.bin")
        self.step = 1

    def _next_step(self) -> int:
        self.step += 1
        self.state.step = self.step
        return self.step

    def raw_write(self) -> float:
        def go() -> None:
            with open(self.raw_file, "wb") as f:
                f.write(memoryview(self.flat.numpy()))
                f.flush()
                os.fsync(f.fileno())

        return timed(go)

    def raw_read(self) -> float:
        evict(self.raw_file)

        def go() -> None:
            with open(self.raw_file, "rb", buffering=0) as f:
                f.readinto(self.read_buf)

        return timed(go)

    def torch_save(self) -> float:
        path = os.path.join(self.root, "torch_save.pt")

        def go() -> None:
            torch.save({"model": self.state.model.state_dict(), "optim": self.state.optimizer.state_dict()}, path)
            fsync_path(path)

        seconds = timed(go)
        os.remove(path)
        return seconds

    def dcp_only(self) -> float:
        path = os.path.join(self.root, "dcp_only")
        tensors, _ = self.state.tensors_and_meta()
        seconds = timed(lambda: dcp.save(tensors, storage_writer=FileSystemWriter(path, thread_count=2)))
        shutil.rmtree(path)
        return seconds

    def hash_pass(self, algorithm: str) -> float:
        def go() -> None:
            digest = checksum.hasher(algorithm)
            view = memoryview(self.flat.numpy())
            for i in range(0, len(view), 8 << 20):
                digest.update(view[i : i + (8 << 20)])

        return timed(go)

    def sync_save(self) -> float:
        run = os.path.join(self.root, "sync")
        ckpt = Checkpointer(run, keep_latest_k=1, config_hash="bench")
        self._next_step()
        seconds = timed(lambda: ckpt.save(self.state))
        return seconds

    def train_step(self, fence: Callable[[], None] = lambda: None) -> float:
        """What the training thread does after a save: forward/backward, fence, optimizer step."""
        started = time.perf_counter()
        model = self.state.model
        loss = torch.nn.functional.cross_entropy(model(self.images), self.labels)
        loss.backward()
        fence()
        self.state.optimizer.step()
        self.state.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    def async_save(self) -> tuple[float, float, float]:
        """(training-thread stall, seconds to commit, the next training step's duration)."""
        self._next_step()
        started = time.perf_counter()
        self.async_ckpt.save(self.state)
        call = time.perf_counter() - started
        step = self.train_step(self.async_ckpt.fence)
        assert self.async_ckpt._async is not None
        stall = call + self.async_ckpt._async.last_fence_s
        self.async_ckpt.wait()
        return stall, time.perf_counter() - started, step

    def load(self) -> float:
        """What ``run`` does to resume: find the newest checkpoint, load it (verifying it) into the live state."""
        storage = LocalStorage(os.path.join(self.root, "sync"))
        ref = manifest.newest_valid(storage)
        assert ref is not None
        evict(ref.url)

        def go() -> None:
            plan = resume.ResumePlan(local=manifest.valid_refs(storage, checksums=False))
            _, _, found = resume.load_newest(plan, storage.url(layout.CKPT_DIR), lambda: (None, self.state))
            assert found is not None and found.step == ref.step

        return timed(go)

    def dcp_load(self) -> float:
        """DCP's stock reader into the same live state, verifying nothing: what the one-pass reader replaced."""
        ref = manifest.newest_valid(LocalStorage(os.path.join(self.root, "sync")))
        assert ref is not None
        evict(ref.url)

        def go() -> None:
            dest = self.state.load_destination()
            dcp.load(dest, storage_reader=FileSystemReader(ref.url), planner=SafeLoadPlanner())

        return timed(go)

    def close(self) -> None:
        self.async_ckpt.close()


def run(rounds: int, root: str) -> dict[str, Any]:
    bench = Bench(root)
    gb = bench.nbytes / 1e9
    # Warm-up (untimed): allocates the async snapshot buffers and the first checkpoint to load.
    bench.async_save()
    bench.sync_save()
    bench.train_step()
    methods = ["raw_write", "torch_save", "sync_save", "async_save", "train_step", "dcp_only", "sha256", "loads"]
    samples: dict[str, list[float]] = {}
    for r in range(rounds):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        for m in order:
            if m == "async_save":
                stall, total, step = bench.async_save()
                samples.setdefault("async_stall_s", []).append(stall)
                samples.setdefault("async_commit_s", []).append(total)
                samples.setdefault("step_during_async_s", []).append(step)
            elif m == "train_step":
                samples.setdefault("step_alone_s", []).append(bench.train_step())
            elif m == "sha256":
                samples.setdefault("sha256_s", []).append(bench.hash_pass("sha256"))
                samples.setdefault("xxh3_s", []).append(bench.hash_pass(checksum.MANIFEST_ALGORITHM))
            elif m == "loads":
                # NOTE: the three cold reads rotate too, so none is always the first after a write.
                reads = ["raw_read", "load", "dcp_load"]
                for read in reads[r % 3 :] + reads[: r % 3]:
                    samples.setdefault(f"{read}_s", []).append(getattr(bench, read)())
            else:
                samples.setdefault(f"{m}_s", []).append(getattr(bench, m)())
        raw = samples["raw_read_s"][-1]
        print(
            f"round {r + 1}/{rounds} done: raw read {raw:.3f} s, load {samples['load_s'][-1]:.3f} s "
            f"({raw / samples['load_s'][-1]:.2f}), DCP {samples['dcp_load_s'][-1]:.3f} s",
            file=sys.stderr,
            flush=True,
        )
    bench.close()

    def ratio(num: str, den: str, invert: bool = False) -> float:
        pairs = zip(samples[num], samples[den], strict=True)
        return statistics.median((d / n) if invert else (n / d) for n, d in pairs)

    med = {k: statistics.median(v) for k, v in samples.items()}
    figures: dict[str, Any] = {
        "bytes": bench.nbytes,
        "rounds": rounds,
        "seconds": {k: round(v, 3) for k, v in med.items()},
        "gb_per_s": {
            k.removesuffix("_s"): round(gb / v, 3) for k, v in med.items() if "step" not in k and "stall" not in k
        },
        # Throughput ratios: raw time / our time.
        "save_vs_raw": round(ratio("sync_save_s", "raw_write_s", invert=True), 3),
        "torch_save_vs_raw": round(ratio("torch_save_s", "raw_write_s", invert=True), 3),
        "dcp_only_vs_raw": round(ratio("dcp_only_s", "raw_write_s", invert=True), 3),
        "async_stall_vs_sync": round(ratio("async_stall_s", "sync_save_s"), 4),
        "async_commit_vs_sync": round(ratio("async_commit_s", "sync_save_s"), 3),
        "load_vs_raw_read": round(ratio("load_s", "raw_read_s", invert=True), 3),
        "load_vs_raw_read_min": round(
            min(r / s for s, r in zip(samples["load_s"], samples["raw_read_s"], strict=True)), 3
        ),
        "dcp_load_vs_raw_read": round(ratio("dcp_load_s", "raw_read_s", invert=True), 3),
        # The cost a stall does not show: the training step that runs next to the background write
        # (ViT-B/16, batch 2) against one without a write in progress, on the same cores.
        "step_slowdown_during_async": round(ratio("step_during_async_s", "step_alone_s"), 3),
        "samples": {k: [round(x, 3) for x in v] for k, v in samples.items()},
    }
    figures["targets"] = {
        k: {"target": f"{op} {v}", "met": figures[k] >= v if op == ">=" else figures[k] <= v}
        for k, (op, v) in TARGETS.items()
    }
    return figures


def table(f: dict[str, Any]) -> str:
    gb = f["bytes"] / 1e9
    s, rate = f["seconds"], f["gb_per_s"]
    rows = [
        ("raw write + fsync", s["raw_write_s"], rate["raw_write"], 1.0),
        ("torch.save + fsync", s["torch_save_s"], rate["torch_save"], f["torch_save_vs_raw"]),
        ("DCP save alone (2 threads)", s["dcp_only_s"], rate["dcp_only"], f["dcp_only_vs_raw"]),
        ("sha256 of the bytes (1 core)", s["sha256_s"], rate["sha256"], None),
        ("xxh3_128 of the bytes (1 core)", s["xxh3_s"], rate["xxh3"], None),
        ("our sync save", s["sync_save_s"], rate["sync_save"], f["save_vs_raw"]),
        ("our async save: stall", s["async_stall_s"], None, None),
        ("  train step alone (B/16, bs 2)", s["step_alone_s"], None, None),
        ("  train step next to the write", s["step_during_async_s"], None, None),
        ("our async save: committed", s["async_commit_s"], rate["async_commit"], None),
        ("raw read (cold)", s["raw_read_s"], rate["raw_read"], 1.0),
        ("our load (one pass, verified)", s["load_s"], rate["load"], f["load_vs_raw_read"]),
        ("DCP's reader, unverified", s["dcp_load_s"], rate["dcp_load"], f["dcp_load_vs_raw_read"]),
    ]
    lines = [f"ViT-B/16 + AdamW state: {gb:.2f} GB, median of {f['rounds']} rounds", ""]
    lines.append(f"| {'method':<30} | {'seconds':>8} | {'GB/s':>6} | {'vs raw':>6} |")
    lines.append(f"|{'-' * 32}|{'-' * 10}|{'-' * 8}|{'-' * 8}|")
    for name, sec, gbps, vs in rows:
        g = f"{gbps:.2f}" if gbps is not None else ""
        v = f"{vs:.2f}" if vs is not None else ""
        lines.append(f"| {name:<30} | {sec:>8.3f} | {g:>6} | {v:>6} |")
    lines.append("")
    lines.append(f"step_slowdown_during_async = {f['step_slowdown_during_async']} (not a target: the cores are shared)")
    lines.append(f"load_vs_raw_read_min = {f['load_vs_raw_read_min']} (the worst round)")
    for key, t in f["targets"].items():
        lines.append(f"{key} = {f[key]}  (target {t['target']}: {'met' if t['met'] else 'NOT met'})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="scratch folder on the disk to measure (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir)
    try:
        figures = run(args.rounds, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(figures) if args.json else table(figures))


if __name__ == "__main__":
    main()
