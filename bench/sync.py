"""Sync benchmark: runner's syncer vs ``aws s3 sync`` vs open_clip's ``remote_sync`` (fsspec), same server.

One moto server (a subprocess on 127.0.0.1) serves every measurement; each measurement gets a fresh
bucket. The run directory is realistic: a couple of hundred small files (events, metrics, configs,
logs) plus a few 100 MB checkpoint shards. Two scenarios per tool:

- full: upload the whole directory to an empty bucket;
- incremental: after a full upload by the same tool (not timed), 3 files change (a 100 MB shard
  rewritten with the same size, a small file rewritten with the same size, a log that grew) and the
  tool syncs again (timed).

After every measurement the remote is checked against the local directory (presence, size, and the
content of the changed files): ``stale`` counts files the tool left wrong. Size-only tools miss
same-size rewrites; a fast wrong answer is not a win.

The profile behind the ratios is measured too: moto's own CPU time during each pass. A pass that lasts about
as long as the server was busy is bound by the server, and awscli's time over moto's CPU time for our pass is
the best ratio any client could reach against this server (printed as the "server-bound ceiling").

Our syncer is measured as it runs in training: one long-lived object whose upload history survives
between passes. awscli is a new process per sync, as open_clip runs it; its start-up is part of its
cost. Medians over ``--repeats`` rounds, tools alternated inside each round (shared/notes/bench.md:
this machine's noise is memory first-touch, so the data is written and read once before timing).

    python bench/sync.py [--repeats 3] [--big-mb 100] [--big-files 3] [--small-files 200] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runner.storage.s3 import S3Connection, S3Storage  # noqa: E402
from runner.sync.syncer import Syncer  # noqa: E402
from tests.s3_server import DUMMY_ENV, S3Server  # noqa: E402

MB = 1 << 20


# --------------------------------------------------------------------------- the run directory
def make_run_dir(root: Path, small_files: int, big_files: int, big_mb: int) -> list[str]:
    """Write the directory; returns the 3 files the incremental scenario changes."""
    rng = __import__("random").Random(0)
    for i in range(small_files):
        kind = i % 4
        rel = (
            f"tb/events.out.tfevents.{i:04d}",
            f"logs/rank{i % 8}/part{i:04d}.log",
            f"eval/epoch_{i:04d}.json",
            f"checkpoints/step_{1000 + i}/rank_0.json",
        )[kind]
        write(root / rel, rng.randbytes(rng.randint(1_000, 60_000)))
    for i in range(big_files):
        write(root / f"checkpoints/step_9000/__0_{i}.distcp", os.urandom(big_mb * MB))
    write(root / "checkpoints/step_9000/manifest.json", b'{"step": 9000}')
    write(root / "metrics.jsonl", b'{"step": 1}\n' * 500)
    return ["checkpoints/step_9000/__0_0.distcp", "eval/epoch_0002.json", "metrics.jsonl"]


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def change(root: Path, rels: list[str], round_: int) -> None:
    """Same-size rewrite of a big and a small file (new bytes, new mtime); append to the log."""
    for rel in rels[:2]:
        path = root / rel
        data = bytearray(path.read_bytes())
        data[:64] = hashlib.sha256(f"{rel}{round_}{time.time()}".encode()).digest() * 2
        path.write_bytes(bytes(data))
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))  # coarse clocks: make it differ
    with (root / rels[2]).open("ab") as f:
        f.write(b'{"step": 2}\n')


def local_files(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def stale_count(server: S3Server, bucket: str, prefix: str, root: Path, changed: list[str]) -> int:
    objects = server.objects(bucket, prefix)
    stale = sum(1 for rel, size in local_files(root).items() if objects.get(rel) != size)
    for rel in changed:
        if rel in objects and server.read(bucket, prefix + rel) != (root / rel).read_bytes():
            stale += 1
    return stale


# --------------------------------------------------------------------------- the tools
class Ours:
    name = "runner"

    def __init__(self, server: S3Server, root: Path) -> None:
        self.server, self.root = server, root
        self.syncer: Syncer | None = None

    def begin(self, bucket: str) -> None:
        remote = S3Storage(f"s3://{bucket}/run", S3Connection(endpoint_url=self.server.endpoint), fail_fast=True)
        self.syncer = Syncer(str(self.root), remote)

    def sync(self, bucket: str) -> None:
        assert self.syncer is not None
        result = self.syncer.sync_once()
        if not result.ok:
            raise RuntimeError(f"runner sync failed: {result.failed}")


class AwsCli:
    name = "awscli"

    def __init__(self, server: S3Server, root: Path) -> None:
        self.server, self.root = server, root
        self.aws = shutil.which("aws")
        if self.aws is None:
            raise SystemExit("`aws` (awscli) is not on PATH: pip install awscli (any Python) and re-run")

    def begin(self, bucket: str) -> None:
        pass

    def sync(self, bucket: str) -> None:
        cmd = [self.aws, "s3", "sync", str(self.root), f"s3://{bucket}/run", "--only-show-errors"]
        subprocess.run([*cmd, "--endpoint-url", self.server.endpoint], check=True, env={**os.environ, **DUMMY_ENV})


class OpenClip:
    name = "open_clip"

    def __init__(self, server: S3Server, root: Path) -> None:
        import fsspec

        try:
            from open_clip_train.file_utils import remote_sync
        except ImportError as e:
            raise SystemExit(f"open_clip_train is missing ({e}): pip install --no-deps open_clip_torch") from e
        self.remote_sync = remote_sync
        # open_clip calls fsspec.get_mapper(remote_dir) with no options: point s3fs at moto globally.
        fsspec.config.conf["s3"] = {"client_kwargs": {"endpoint_url": server.endpoint}}
        self.root = root

    def begin(self, bucket: str) -> None:
        pass

    def sync(self, bucket: str) -> None:
        if not self.remote_sync(str(self.root), f"s3://{bucket}/run", "fsspec"):
            raise RuntimeError("open_clip remote_sync returned False")


# --------------------------------------------------------------------------- measuring
def paired_bound(times: dict[str, dict[str, list[float]]], cpu: dict[str, dict[str, list[float]]], kind: str) -> float:
    pairs = zip(times["awscli"][kind], cpu["runner"][kind], strict=True)
    return round(statistics.median(a / c for a, c in pairs), 2)


def timed(fn: Callable[[], None], server: S3Server, cpu: list[float]) -> float:
    """Wall seconds of ``fn()``; appends the server's CPU seconds during it to ``cpu``."""
    server_before = server.cpu_seconds()
    started = time.perf_counter()
    fn()
    seconds = time.perf_counter() - started
    cpu.append(server.cpu_seconds() - server_before)
    return seconds


def measure(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    server = S3Server(as_process=True)
    os.environ.update(DUMMY_ENV)
    server.start()
    try:
        root = work / "run"
        changed = make_run_dir(root, args.small_files, args.big_files, args.big_mb)
        for p in root.rglob("*"):  # Pre-touch: page cache warm before any timed round.
            if p.is_file():
                p.read_bytes()
        total_mb = sum(local_files(root).values()) / 1e6
        tools = [Ours(server, root), AwsCli(server, root), OpenClip(server, root)]
        times: dict[str, dict[str, list[float]]] = {t.name: {"full": [], "incremental": []} for t in tools}
        server_cpu: dict[str, dict[str, list[float]]] = {t.name: {"full": [], "incremental": []} for t in tools}
        stale: dict[str, dict[str, int]] = {t.name: {"full": 0, "incremental": 0} for t in tools}
        for round_ in range(args.repeats):
            order = tools if round_ % 2 == 0 else tools[::-1]
            for tool in order:
                bucket = server.new_bucket(f"{tool.name.replace('_', '')}-full")
                tool.begin(bucket)
                cpu = server_cpu[tool.name]
                times[tool.name]["full"].append(
                    timed(lambda tool=tool, bucket=bucket: tool.sync(bucket), server, cpu["full"])
                )
                stale[tool.name]["full"] = max(stale[tool.name]["full"], stale_count(server, bucket, "run/", root, []))
                change(root, changed, round_)
                times[tool.name]["incremental"].append(
                    timed(lambda tool=tool, bucket=bucket: tool.sync(bucket), server, cpu["incremental"])
                )
                stale[tool.name]["incremental"] = max(
                    stale[tool.name]["incremental"], stale_count(server, bucket, "run/", root, changed)
                )
                print(
                    f"round {round_ + 1}/{args.repeats} {tool.name:10s} full {times[tool.name]['full'][-1]:6.2f}s "
                    f"incremental {times[tool.name]['incremental'][-1]:6.2f}s",
                    file=sys.stderr,
                    flush=True,
                )
        med = {name: {k: statistics.median(v) for k, v in d.items()} for name, d in times.items()}

        def paired(base: str, kind: str) -> float:
            """Median of per-round ratios: both tools ran back to back, under the same machine load."""
            pairs = zip(times[base][kind], times["runner"][kind], strict=True)
            return round(statistics.median(b / r for b, r in pairs), 2)

        return {
            "files": len(local_files(root)),
            "total_mb": round(total_mb, 1),
            "repeats": args.repeats,
            "seconds": {n: {k: round(v, 3) for k, v in d.items()} for n, d in med.items()},
            "samples": times,
            # The profile behind the ratios: moto's own CPU seconds during each pass. A pass that takes about
            # as long as the server's CPU time is bound by the server, not by the tool.
            "server_cpu_s": {
                n: {k: round(statistics.median(v), 3) for k, v in d.items()} for n, d in server_cpu.items()
            },
            # The best incremental_vs_awscli any client could reach against this server: awscli's pass over the
            # server's CPU time for runner's pass (a client that cost nothing still waits for the server).
            "incremental_vs_awscli_server_bound": paired_bound(times, server_cpu, "incremental"),
            "full_vs_awscli_server_bound": paired_bound(times, server_cpu, "full"),
            "stale_files": stale,
            "full_vs_awscli": paired("awscli", "full"),
            "incremental_vs_awscli": paired("awscli", "incremental"),
            "full_vs_openclip": paired("open_clip", "full"),
            "incremental_vs_openclip": paired("open_clip", "incremental"),
        }
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def table(r: dict[str, Any]) -> str:
    lines = [
        f"run directory: {r['files']} files, {r['total_mb']} MB; medians of {r['repeats']} rounds; moto on loopback",
        f"{'tool':10s} {'full s':>8s} {'MB/s':>7s} {'incr s':>8s} {'stale full/incr':>16s}",
    ]
    for name, s in r["seconds"].items():
        st = r["stale_files"][name]
        lines.append(
            f"{name:10s} {s['full']:8.2f} {r['total_mb'] / s['full']:7.1f} {s['incremental']:8.2f} "
            f"{st['full']:>8d}/{st['incremental']:<7d}"
        )
    lines.append(
        "paired per-round medians: "
        f"runner is {r['full_vs_awscli']}x faster than awscli (full), {r['incremental_vs_awscli']}x (incremental); "
        f"{r['full_vs_openclip']}x / {r['incremental_vs_openclip']}x vs open_clip's remote_sync"
    )
    cpu = r["server_cpu_s"]
    lines.append(
        "moto's CPU seconds during each pass (full / incremental): "
        + "; ".join(f"{name} {c['full']:.2f} / {c['incremental']:.2f}" for name, c in cpu.items())
    )
    lines.append(
        "server-bound ceiling (awscli's time / moto's CPU time for runner's pass): "
        f"full {r['full_vs_awscli_server_bound']}x, incremental {r['incremental_vs_awscli_server_bound']}x"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big-mb", type=int, default=100)
    parser.add_argument("--big-files", type=int, default=3)
    parser.add_argument("--small-files", type=int, default=200)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (table on stderr)")
    args = parser.parse_args()
    result = measure(args)
    if args.json:  # One JSON object on stdout (bench/README.md); the table goes to stderr.
        print(table(result), file=sys.stderr)
        print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    else:
        print(table(result))


if __name__ == "__main__":
    main()
