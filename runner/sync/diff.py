"""Which files a sync pass uploads: decisions over the local files' versions, the remote listing and what
this syncer uploaded before. No I/O here (hashing and transfers are the syncer's), so each case is a unit test.

Change detection (the part size-only tools get wrong): a file is skipped when its size and mtime equal
those recorded at its last upload *and* the remote still holds an object of that size (with the content
key recorded, where the listing names keys). Otherwise, if the sizes match, content decides: the content
key of the local file (the S3 ETag computed locally, or sha256 for other backends) against the remote's,
checked while the file uploads (the upload is cancelled if they match). A same-size rewrite therefore
uploads, and a checkpoint downloaded for a resume does not.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from runner.checkpoint.layout import folder_of, is_partial, manifest_step
from runner.storage.base import Entry

#: Files at least this big get a fast local fingerprint when uploaded (see :attr:`Uploaded.fingerprint`).
FINGERPRINT_MIN_BYTES = 1 << 20


class Version(NamedTuple):
    """One version of a local file, as a walk sees it."""

    size: int
    mtime_ns: int


@dataclass
class Uploaded:
    """What this syncer uploaded of one file."""

    version: Version
    #: Content key of this version, once known (recorded at the upload, or learned from a later listing).
    key: str | None = None
    #: xxh3 of the uploaded content (big files only), taken beside the upload and kept only if the file's
    #: size and mtime did not move from the walk until the upload finished. When the file is rewritten with
    #: the same size, a different fingerprint proves the content changed at a fraction of the cost of the
    #: content key (the S3 ETag is an MD5 pass, ~0.6 GB/s; xxh3 runs at memory speed).
    fingerprint: str | None = None


class Verdict(NamedTuple):
    """What a pass does with one file."""

    upload: bool
    #: Same size, unknown version: upload unless the local content has this key (checked beside the upload).
    unless_key: str | None = None


SKIP = Verdict(False)
UPLOAD = Verdict(True)


def excluded(rel: str, patterns: Iterable[str]) -> bool:
    """Never upload uncommitted work (``*.tmp`` folders, ``.part`` files) or what the user excluded."""
    if is_partial(rel):
        return True
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(name, pat) for pat in patterns)


def changed_since_upload(local: Mapping[str, Version], seen: Mapping[str, Uploaded]) -> list[str]:
    """Files this syncer uploaded that changed locally since (checkpoint manifests aside: they go last).

    They go up whatever the remote listing says, unless their content turns out to be what the remote
    holds, so their uploads start before the listing is back.
    """
    return [
        rel
        for rel, version in local.items()
        if manifest_step(rel) is None and (done := seen.get(rel)) is not None and done.version != version
    ]


def learn_keys(seen: Mapping[str, Uploaded], local: Mapping[str, Version], listing: Mapping[str, Entry]) -> None:
    """Record the listed content key of each file uploaded from the version still on disk (an upload to a
    backend that lists keys does not compute it): from then on a different listed key means someone
    replaced the object."""
    for rel, version in local.items():
        done, there = seen.get(rel), listing.get(rel)
        if done is not None and done.version == version and done.key is None and there is not None:
            done.key = there.key


def remote_key(there: Entry, done: Uploaded | None) -> str | None:
    """The content key of the remote object: listed (S3 ETag), or recorded when we uploaded it."""
    return there.key if there.key is not None else (done.key if done is not None else None)


def verdict(version: Version, there: Entry | None, done: Uploaded | None) -> Verdict:
    """Upload, skip, or let the content decide; ``there``: the remote object, ``done``: our last upload."""
    if there is None or there.size != version.size:
        return UPLOAD
    if done is not None and done.version == version:
        # Uploaded from this very version. A different remote key means someone replaced the object: put ours back.
        replaced = done.key is not None and there.key is not None and done.key != there.key
        return UPLOAD if replaced else SKIP
    # Same size, different or unknown version: the content decides (hashed by the upload worker).
    key = remote_key(there, done)
    return UPLOAD if key is None else Verdict(True, key)


def plan(
    local: Mapping[str, Version], listing: Mapping[str, Entry], seen: Mapping[str, Uploaded]
) -> dict[str, Verdict]:
    """The files of ``local`` to upload (or to check), with their verdicts."""
    verdicts = {rel: verdict(version, listing.get(rel), seen.get(rel)) for rel, version in local.items()}
    return {rel: v for rel, v in verdicts.items() if v.upload}


def _broken(failed: Iterable[str]) -> set[str | None]:
    return {folder_of(rel) for rel in failed}


def held_back(manifests: Iterable[str], failed: Iterable[str]) -> set[str]:
    """Manifests whose checkpoint folder had a file fail: a manifest is what makes a remote checkpoint
    valid, so it must never be visible before all its data."""
    broken = _broken(failed)
    return {rel for rel in manifests if folder_of(rel) in broken}


def confirmed_steps(local: Iterable[str], failed: Iterable[str]) -> set[int]:
    """Checkpoints of ``local`` with a manifest and no file failed in the pass: the remote holds them now."""
    broken = _broken(failed)
    return {step for rel in local if (step := manifest_step(rel)) is not None and folder_of(rel) not in broken}
