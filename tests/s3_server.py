"""A local S3 server for tests and benchmarks: moto on 127.0.0.1, a free port, dummy credentials.

Two modes. In-process (``ThreadedMotoServer``) starts in well under a second: the shared session server.
As a subprocess (``python -m moto.server``), for outage tests: killing the process drops every open
connection, which is what an outage looks like to a client (a stopped in-process server keeps serving
requests on already-open keep-alive connections). A restarted subprocess comes back empty: the tests
recreate the bucket, the "fresh bucket" case of the issue.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.helpers.ports import free_port

#: Dummy credentials moto accepts; tests plant their own secret values on top where they need to.
DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    # Never read a developer's ~/.aws: tests must not depend on (or leak) real credentials.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


class S3Server:
    """moto's S3 on loopback; :meth:`stop` and :meth:`start` again keep the port (and the data)."""

    def __init__(self, port: int | None = None, as_process: bool = False) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.as_process = as_process
        self._server: Any = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.as_process:
            cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
            self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self._wait_up()
            return
        from moto.server import ThreadedMotoServer

        deadline = time.monotonic() + 10
        while True:
            try:
                self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
                self._server.start()
                break
            except OSError:  # The port may linger for a moment after a stop.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self._wait_up()

    def _wait_up(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self._proc.returncode} (port {self.port} taken?)")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"moto server did not come up on {self.endpoint}")

    def stop(self) -> None:
        if self._proc is not None:  # By its PID, and wait, so no process outlives the test.
            os.kill(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._server is not None:
            self._server.stop()
            self._server = None

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server process has used so far; ``as_process`` servers on Linux only."""
        if self._proc is None:
            raise RuntimeError("cpu_seconds needs a server started with as_process=True")
        with open(f"/proc/{self._proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def client(self) -> Any:
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def new_bucket(self, prefix: str = "b") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Key -> size of everything under ``prefix`` (keys relative to it)."""
        out: dict[str, int] = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"][len(prefix) :]] = int(obj["Size"])
        return out

    def read(self, bucket: str, key: str) -> bytes:
        return bytes(self.client().get_object(Bucket=bucket, Key=key)["Body"].read())


@contextmanager
def dummy_credentials(extra: dict[str, str] | None = None) -> Iterator[None]:
    """Set the dummy AWS environment for the block, then restore the previous one."""
    values = {**DUMMY_ENV, **(extra or {})}
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def running_server() -> Iterator[S3Server]:
    server = S3Server()
    with dummy_credentials():
        server.start()
        try:
            yield server
        finally:
            server.stop()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_tree(run_dir: Path) -> dict[str, str]:
    """rel path -> sha256 of what the syncer mirrors (``logs/`` is excluded by default)."""
    return {
        p.relative_to(run_dir).as_posix(): sha(p.read_bytes())
        for p in run_dir.rglob("*")
        if p.is_file() and not p.relative_to(run_dir).as_posix().startswith("logs/")
    }


def remote_tree(server: S3Server, bucket: str, prefix: str) -> dict[str, str]:
    return {rel: sha(server.read(bucket, prefix + rel)) for rel in server.objects(bucket, prefix)}


def s3_args(endpoint: str, bucket: str, every: str = "1s") -> list[str]:
    """The overrides of a run that syncs to ``s3://<bucket>/runs`` at ``endpoint`` every ``every``."""
    return [
        "storage=s3",
        f"storage.url=s3://{bucket}/runs",
        f"storage.endpoint_url={endpoint}",
        f"storage.sync_every={every}",
    ]


def remote_steps(server: S3Server, bucket: str) -> set[int]:
    """Steps whose manifest is on the server under ``runs/`` (read directly, never through a proxy)."""
    return {
        int(m.group(1))
        for key in server.objects(bucket, "runs/")
        if (m := re.search(r"/checkpoints/step_(\d+)/manifest\.json$", key))
    }
