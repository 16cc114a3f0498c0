"""S3 fixtures: one moto server per session on 127.0.0.1 (free port, dummy credentials), a bucket per test.

Under ``CI=true`` a missing moto is an error, never a skip: CI must run the S3 tests.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from tests.conftest import IN_CI
from tests.s3_server import S3Server, dummy_credentials, running_server

if not IN_CI:
    pytest.importorskip("moto.server", reason="pip install 'moto[server]' (the test extra) to run the S3 tests")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    with running_server() as server:
        yield server


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket: tests never see each other's objects."""
    return s3_server.new_bucket()


@pytest.fixture
def own_server() -> Iterator[S3Server]:
    """A moto subprocess this test alone may kill and restart (same port, empty again); stopped at the end."""
    with dummy_credentials():
        server = S3Server(as_process=True)
        server.start()
        try:
            yield server
        finally:
            server.stop()
