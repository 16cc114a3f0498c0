"""The background syncer: what it uploads, in which order, what it skips, and how it survives an outage."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from runner.storage import Storage, StorageSettings
from runner.storage.s3 import S3Connection, S3Storage, s3_etag, scrub
from runner.sync.syncer import SyncConflict, Syncer, SyncError, SyncSettings
from tests.s3_server import S3Server

MB = 1 << 20


def write(root: Path, rel: str, data: bytes, mtime_bump: float = 0.0) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime_bump:  # NOTE: coarse filesystem clocks could give a rewrite the same mtime; make it differ.
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + int(mtime_bump * 1e9)))


def checkpoint(root: Path, step: int, payload: bytes = b"w" * 1000, manifest: bytes | None = None) -> None:
    folder = f"checkpoints/step_{step}"
    write(root, f"{folder}/__0_0.distcp", payload)
    write(root, f"{folder}/.metadata", b"meta")
    write(root, f"{folder}/manifest.json", b'{"step": %d}' % step if manifest is None else manifest)


def remote_tree(remote: Storage) -> dict[str, int]:
    return {rel: obj.size for rel, obj in remote.listing().items()}


def local_tree(root: Path, skip: Callable[[str], bool] = lambda rel: False) -> dict[str, int]:
    out = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not skip(rel):
            out[rel] = path.stat().st_size
    return out


def _s3(url: str, server: S3Server, part_bytes: int = 8 * MB) -> Storage:
    """An S3 storage as the syncer gets it (few, quick retries per request)."""
    return S3Storage(url, S3Connection(endpoint_url=server.endpoint), fail_fast=True, part_bytes=part_bytes)


def _s3_remote(request: pytest.FixtureRequest) -> Storage:
    server: S3Server = request.getfixturevalue("s3_server")
    # 5 MiB parts (S3's minimum) so a small test file already exercises the multipart ETag.
    return _s3(f"s3://{server.new_bucket('sync')}/runs/r1", server, part_bytes=5 * MB)


def _memory_remote(request: pytest.FixtureRequest) -> Storage:
    return StorageSettings().open_url(f"memory://sync-{uuid.uuid4().hex[:8]}/runs/r1")


@pytest.fixture(
    params=[pytest.param(_s3_remote, id="s3", marks=pytest.mark.s3), pytest.param(_memory_remote, id="memory")]
)
def remote(request: pytest.FixtureRequest) -> Storage:
    make: Callable[[pytest.FixtureRequest], Storage] = request.param
    return make(request)


def test_uploads_new_and_changed_files_only(tmp_path: Path, remote: Storage) -> None:
    run = tmp_path / "run"
    write(run, "metrics.jsonl", b"a" * 100)
    write(run, "big.bin", os.urandom(11 * MB))  # multipart on S3
    write(run, "same.txt", b"1" * 50)
    write(run, "touched.txt", b"t" * 70)
    syncer = Syncer(str(run), remote)
    first = syncer.sync_once()
    assert sorted(first.uploaded) == ["big.bin", "metrics.jsonl", "same.txt", "touched.txt"]
    assert syncer.sync_once().uploaded == []

    write(run, "metrics.jsonl", b"a" * 150)  # grew
    write(run, "same.txt", b"2" * 50, mtime_bump=1)  # same size, new content
    big = (run / "big.bin").read_bytes()
    write(run, "big.bin", big[:-1] + bytes([big[-1] ^ 1]), mtime_bump=1)  # one byte of a multipart file
    write(run, "touched.txt", b"t" * 70, mtime_bump=1)  # new mtime, same content: no upload
    assert sorted(syncer.sync_once().uploaded) == ["big.bin", "metrics.jsonl", "same.txt"]
    assert syncer.sync_once().uploaded == []
    assert remote_tree(remote) == local_tree(run)
    # A fresh syncer (new process, e.g. after a restart or a resume) knows no upload history: S3 lists
    # content keys (ETags), so identical files are recognised; other backends list sizes only, so the
    # syncer re-uploads what it cannot verify rather than trust a size.
    fresh = Syncer(str(run), remote).sync_once().uploaded
    assert sorted(fresh) == ([] if remote.lists_content_keys else sorted(local_tree(run)))


def test_manifest_goes_last_and_only_with_all_its_data(tmp_path: Path, remote: Storage) -> None:
    run = tmp_path / "run"
    checkpoint(run, 3)
    checkpoint(run, 6)
    write(run, "metrics.jsonl", b"x")
    order: list[str] = []
    real_upload = remote.put

    def recording(
        local_file: str, rel: str, progress: Callable[[int], None] | None = None, cancel: threading.Event | None = None
    ) -> None:
        if rel == "checkpoints/step_6/.metadata":
            raise RuntimeError("injected failure")
        real_upload(local_file, rel, progress, cancel)
        order.append(rel)

    remote.put = recording  # type: ignore[method-assign]
    syncer = Syncer(str(run), remote, SyncSettings(retries=2, backoff_s=0.01))
    result = syncer.sync_once()
    assert set(result.failed) == {"checkpoints/step_6/.metadata", "checkpoints/step_6/manifest.json"}
    manifest_at = order.index("checkpoints/step_3/manifest.json")
    assert all(
        order.index(rel) < manifest_at
        for rel in order
        if rel.startswith("checkpoints/step_3/") and rel != "checkpoints/step_3/manifest.json"
    )
    assert "checkpoints/step_6/manifest.json" not in remote_tree(remote)
    assert syncer.confirmed(3) and not syncer.confirmed(6)

    remote.put = real_upload  # type: ignore[method-assign]
    assert syncer.sync_once().ok
    assert syncer.confirmed(6)
    assert remote_tree(remote) == local_tree(run)


def test_excludes_uncommitted_and_configured(tmp_path: Path, remote: Storage) -> None:
    run = tmp_path / "run"
    checkpoint(run, 1)
    write(run, "checkpoints/step_2.tmp/__0_0.distcp", b"partial")
    write(run, "checkpoints/step_1/x.part", b"partial")
    write(run, "logs/rank0.log", b"log")
    write(run, "tb/events.out", b"e")
    write(run, "scratch.core", b"c")
    result = Syncer(str(run), remote, SyncSettings(exclude=["logs/*", "*.core"])).sync_once()
    assert sorted(result.uploaded) == [
        "checkpoints/step_1/.metadata",
        "checkpoints/step_1/__0_0.distcp",
        "checkpoints/step_1/manifest.json",
        "tb/events.out",
    ]


def test_remote_retention_deletes_only_what_this_run_wrote(tmp_path: Path, remote: Storage) -> None:
    # Step 1 is on the remote from an earlier run; this run resumed from step 2 (protected).
    earlier = tmp_path / "earlier"
    checkpoint(earlier, 1)
    checkpoint(earlier, 2)
    assert Syncer(str(earlier), remote).sync_once().ok
    run = tmp_path / "run"
    for step in (2, 3, 4):
        checkpoint(run, step)
    syncer = Syncer(str(run), remote, SyncSettings(keep_latest_k=2), protect={2})
    assert syncer.sync_once().deleted == []  # 3 and 4 are the newest two, 2 is protected
    checkpoint(run, 5)
    checkpoint(run, 6)
    result = syncer.sync_once()
    assert sorted(result.deleted) == ["checkpoints/step_3", "checkpoints/step_4"]
    steps = {rel.split("/")[1] for rel in remote_tree(remote) if rel.endswith("manifest.json")}
    assert steps == {"step_1", "step_2", "step_5", "step_6"}
    assert not any(rel.startswith(("checkpoints/step_3/", "checkpoints/step_4/")) for rel in remote_tree(remote))


def test_remote_retention_covers_what_an_earlier_process_of_this_run_wrote(tmp_path: Path, remote: Storage) -> None:
    # A requeued (or restarted) job is a new process of the same run: the checkpoints its first process
    # uploaded are the run's own, and keep_latest_k must bound them too, or every requeue leaves k behind.
    def ours(step: int) -> bytes:
        return b'{"step": %d, "config_hash": "abc123"}' % step

    first = tmp_path / "first"
    for step in (1, 2, 3):
        checkpoint(first, step, manifest=ours(step))
    checkpoint(first, 4, manifest=b'{"step": 4, "config_hash": "another"}')  # a different run, same name
    checkpoint(first, 5, manifest=b"{not json")  # unreadable: not provably ours
    assert Syncer(str(first), remote, owner="abc123").sync_once().ok

    requeued = tmp_path / "requeued"  # a new machine: it resumed from step 3, downloaded from the remote
    checkpoint(requeued, 3, manifest=ours(3))
    syncer = Syncer(str(requeued), remote, SyncSettings(keep_latest_k=1), protect={3}, owner="abc123")
    for step in (6, 7):
        checkpoint(requeued, step, manifest=ours(step))
    result = syncer.sync_once()
    assert result.ok, result.failed
    # Newest is 7 (kept); 3 is the resume point (protected); 6 was already beyond k, so never uploaded;
    # 1 and 2 are the first process's; 4 and 5 are not this run's.
    assert sorted(result.deleted) == ["checkpoints/step_1", "checkpoints/step_2"]
    steps = {int(rel.split("/")[1][5:]) for rel in remote_tree(remote) if rel.endswith("manifest.json")}
    assert steps == {3, 4, 5, 7}
    assert not any(rel.startswith(("checkpoints/step_1/", "checkpoints/step_2/")) for rel in remote_tree(remote))
    # Without an owner (or with another one) nothing of the first process is touched.
    other = tmp_path / "other"
    checkpoint(other, 8, manifest=ours(8))
    stranger = Syncer(str(other), remote, SyncSettings(keep_latest_k=1), owner="zzz")
    assert stranger.sync_once().deleted == []


def test_identical_copy_of_an_earlier_runs_checkpoint_is_not_claimed(tmp_path: Path, remote: Storage) -> None:
    # This run holds a byte-identical copy of the earlier run's step 2 (say, downloaded to resume from it).
    # Where the remote lists content keys, the syncer sees it is already there: it neither uploads it nor
    # counts it as written by this run, so retention leaves it alone even unprotected.
    earlier = tmp_path / "earlier"
    checkpoint(earlier, 2)
    assert Syncer(str(earlier), remote).sync_once().ok
    run = tmp_path / "run"
    checkpoint(run, 2)
    for rel in ("__0_0.distcp", ".metadata", "manifest.json"):  # new mtimes, same bytes
        path = run / "checkpoints" / "step_2" / rel
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 2_000_000_000))
    checkpoint(run, 3)
    syncer = Syncer(str(run), remote, SyncSettings(keep_latest_k=1))
    result = syncer.sync_once()
    assert result.ok
    if remote.lists_content_keys:
        assert sorted(result.uploaded) == [
            f"checkpoints/step_3/{n}" for n in (".metadata", "__0_0.distcp", "manifest.json")
        ]
        assert result.deleted == []
        assert "checkpoints/step_2/manifest.json" in remote_tree(remote)
    else:  # Sizes only: it cannot verify the copy, so it uploads it and owns what it wrote.
        assert "checkpoints/step_2/manifest.json" in result.uploaded
    assert syncer.sync_once().uploaded == []


def test_a_file_rewritten_again_and_again_is_uploaded_each_time(tmp_path: Path, remote: Storage) -> None:
    # Same size every time, new content every time: each pass fingerprints it (while uploading) and
    # uploads it; the content key (an MD5 pass for S3) is not needed to see that it changed.
    run = tmp_path / "run"
    syncer = Syncer(str(run), remote)
    keyed: list[str] = []
    content_key = remote.content_key
    remote.content_key = lambda path: keyed.append(path) or content_key(path)  # type: ignore[method-assign]
    for i in range(3):
        write(run, "big.bin", bytes([i]) * (6 * MB), mtime_bump=i)
        assert syncer.sync_once().uploaded == ["big.bin"], i
    if remote.lists_content_keys:  # (elsewhere the content key is what an upload records)
        assert keyed == []
    write(run, "big.bin", bytes([2]) * (6 * MB), mtime_bump=5)  # new mtime, same bytes
    assert syncer.sync_once().uploaded == []
    assert keyed  # the fingerprint matched what went up: the remote's content key decided
    assert remote_tree(remote) == local_tree(run)
    # Changed while it uploaded: that fingerprint is not kept, so the next pass goes by content key.
    write(run, "big.bin", bytes([3]) * (6 * MB), mtime_bump=6)
    upload = remote.put

    def rewrite_midway(*args: object, **kwargs: object) -> None:
        upload(*args, **kwargs)  # type: ignore[arg-type]
        write(run, "big.bin", bytes([4]) * (6 * MB), mtime_bump=7)

    remote.put = rewrite_midway  # type: ignore[method-assign]
    assert syncer.sync_once().uploaded == ["big.bin"]
    remote.put = upload  # type: ignore[method-assign]
    assert syncer._seen["big.bin"].fingerprint is None
    assert syncer.sync_once().uploaded == ["big.bin"]
    assert syncer._seen["big.bin"].fingerprint is not None
    assert remote_tree(remote) == local_tree(run)


def test_a_run_that_could_not_see_the_remote_never_overwrites_its_checkpoints(tmp_path: Path, remote: Storage) -> None:
    # An earlier process of the run left checkpoints 1 and 2 (and its metrics) on the remote.
    earlier = tmp_path / "earlier"
    checkpoint(earlier, 1)
    checkpoint(earlier, 2, payload=b"e" * 1000)
    write(earlier, "metrics.jsonl", b"earlier history\n")
    assert Syncer(str(earlier), remote).sync_once().ok
    before = {rel: obj for rel, obj in remote.listing().items()}

    # This process could not list the remote at start (outage) and started fresh: same names, other bytes.
    fresh = tmp_path / "fresh"
    checkpoint(fresh, 1, payload=b"f" * 1000)
    checkpoint(fresh, 2, payload=b"g" * 1000)
    write(fresh, "metrics.jsonl", b"new\n")
    syncer = Syncer(str(fresh), remote, SyncSettings(backoff_s=0.01))
    syncer.guard(resumed_step=None)
    with pytest.raises(SyncConflict, match="up to step 2"):
        syncer.sync_once()
    with pytest.raises(SyncConflict):  # the final sync does not retry: the user has to choose
        syncer.final_sync()
    assert remote.listing() == before, "a guarded syncer uploaded something"
    assert not syncer.confirmed(1) and not syncer.confirmed(2)  # so local retention keeps everything

    # Resumed from step 2 (the newest the remote has): nothing newer there, so it syncs normally.
    resumed = tmp_path / "resumed"
    checkpoint(resumed, 2, payload=b"e" * 1000)
    checkpoint(resumed, 3)
    syncer = Syncer(str(resumed), remote)
    syncer.guard(resumed_step=2)
    assert syncer.sync_once().ok
    assert "checkpoints/step_3/manifest.json" in remote.listing()


def test_a_guarded_syncer_on_an_empty_remote_just_syncs(tmp_path: Path, remote: Storage) -> None:
    run = tmp_path / "run"
    checkpoint(run, 1)
    syncer = Syncer(str(run), remote)
    syncer.guard(resumed_step=None)
    assert syncer.sync_once().ok
    assert remote_tree(remote) == local_tree(run)


def test_checkpoints_superseded_before_upload_are_skipped_and_released(tmp_path: Path, remote: Storage) -> None:
    # Checkpoints came faster than passes: 1-3 are already beyond keep_latest_k=2 when the pass starts.
    run = tmp_path / "run"
    for step in (1, 2, 3, 4, 5):
        checkpoint(run, step)
    syncer = Syncer(str(run), remote, SyncSettings(keep_latest_k=2))
    assert not syncer.confirmed(1)
    result = syncer.sync_once()
    assert {rel.split("/")[1] for rel in result.uploaded} == {"step_4", "step_5"}
    # Local retention may now drop 1-3: a newer checkpoint is safely remote.
    assert all(syncer.confirmed(s) for s in (1, 2, 3, 4, 5))


def test_scrub_blanks_secrets_from_error_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-5ecret-value")
    assert scrub("signature for planted-5ecret-value failed") == "signature for *** failed"


def test_s3_etag_matches_what_s3_reports(tmp_path: Path, s3_server: S3Server) -> None:
    bucket = s3_server.new_bucket("etag")
    remote = _s3(f"s3://{bucket}/p", s3_server, part_bytes=5 * MB)
    for name, size in (("small", 1000), ("exact", 5 * MB), ("multi", 12 * MB + 3)):
        write(tmp_path, name, os.urandom(size))
        remote.put(str(tmp_path / name), name)
        assert remote.listing()[name].key == s3_etag(str(tmp_path / name), 5 * MB), name


# --------------------------------------------------------------------------- outages
def _wait(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@pytest.mark.s3
def test_outage_warns_and_catches_up(
    tmp_path: Path, s3_server: S3Server, own_server: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = own_server.new_bucket("outage")
    remote = _s3(f"s3://{bucket}/r", own_server)
    run = tmp_path / "run"
    checkpoint(run, 1)
    settings = SyncSettings(every_s=0.2, keep_latest_k=1, retries=2, backoff_s=0.01, warn_every_s=60)
    syncer = Syncer(str(run), remote, settings)
    caplog.set_level(logging.INFO, logger="runner.sync.syncer")
    syncer.start()
    try:
        _wait(lambda: syncer.confirmed(1))
        own_server.stop()
        checkpoint(run, 2)
        write(run, "metrics.jsonl", b"during the outage")
        _wait(lambda: syncer.failures >= 2)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "SYNC FAILED" in r.message]
        assert warnings and len(warnings) < syncer.failures, "warn on failure, but rate-limited"
        assert not syncer.confirmed(2)
        own_server.start()  # Same port; a fresh server: the bucket has to be created again.
        own_server.client().create_bucket(Bucket=bucket)
        _wait(lambda: syncer.confirmed(2))
    finally:
        syncer.stop()
    assert "recovered after" in caplog.text
    syncer.final_sync()
    assert remote_tree(remote) == local_tree(run, lambda rel: rel.startswith("checkpoints/step_1/"))
    # Everything, including what was synced before the outage, is back (step 1 retired by keep_latest_k=1).


@pytest.mark.s3
def test_final_sync_fills_a_fresh_bucket_after_the_server_lost_its_data(tmp_path: Path, own_server: S3Server) -> None:
    bucket = own_server.new_bucket("fresh")
    remote = _s3(f"s3://{bucket}/r", own_server)
    run = tmp_path / "run"
    checkpoint(run, 1)
    write(run, "metrics.jsonl", b"m")
    syncer = Syncer(str(run), remote, SyncSettings(retries=1, backoff_s=0.01))
    assert syncer.sync_once().ok
    own_server.stop()
    checkpoint(run, 2)
    with pytest.raises(SyncError, match=rf"final sync of .* to s3://{bucket}/r failed after 2 attempts"):
        syncer.final_sync(attempts=2)
    own_server.start()  # It comes back empty.
    own_server.client().create_bucket(Bucket=bucket)
    syncer.final_sync()
    assert remote_tree(remote) == local_tree(run)
