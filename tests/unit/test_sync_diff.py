"""What a sync pass uploads (runner/sync/diff.py): decisions over versions, listings and upload history, no I/O."""

from __future__ import annotations

from runner.storage.base import Entry
from runner.sync import diff
from runner.sync.diff import SKIP, UPLOAD, Uploaded, Verdict, Version

V1 = Version(size=100, mtime_ns=1)
V2 = Version(size=100, mtime_ns=2)  # same size, rewritten (or touched)


def test_a_file_the_remote_lacks_or_holds_at_another_size_uploads() -> None:
    assert diff.verdict(V1, None, None) == UPLOAD
    assert diff.verdict(V1, Entry(99, "k"), Uploaded(V1, "k")) == UPLOAD


def test_the_version_this_syncer_uploaded_is_skipped_unless_the_remote_object_was_replaced() -> None:
    assert diff.verdict(V1, Entry(100, "k"), Uploaded(V1, "k")) == SKIP
    assert diff.verdict(V1, Entry(100), Uploaded(V1, "k")) == SKIP  # a listing without keys
    assert diff.verdict(V1, Entry(100, "k"), Uploaded(V1)) == SKIP  # key not learned yet
    assert diff.verdict(V1, Entry(100, "other"), Uploaded(V1, "k")) == UPLOAD


def test_a_same_size_file_of_unknown_version_is_decided_by_content() -> None:
    # The listed key wins; else the key recorded at our last upload; with neither, it uploads.
    assert diff.verdict(V2, Entry(100, "listed"), Uploaded(V1, "ours")) == Verdict(True, "listed")
    assert diff.verdict(V2, Entry(100), Uploaded(V1, "ours")) == Verdict(True, "ours")
    assert diff.verdict(V2, Entry(100, "listed"), None) == Verdict(True, "listed")
    assert diff.verdict(V2, Entry(100), None) == UPLOAD


def test_plan_keeps_only_what_uploads_or_is_checked() -> None:
    local = {"same": V1, "new": V1, "rewritten": V2}
    listing = {"same": Entry(100, "k"), "rewritten": Entry(100, "k")}
    seen = {"same": Uploaded(V1, "k"), "rewritten": Uploaded(V1, "k")}
    assert diff.plan(local, listing, seen) == {"new": UPLOAD, "rewritten": Verdict(True, "k")}


def test_keys_are_learned_only_for_the_version_that_went_up() -> None:
    seen = {"a": Uploaded(V1), "b": Uploaded(V1), "c": Uploaded(V1, "mine")}
    diff.learn_keys(seen, {"a": V1, "b": V2, "c": V1}, {"a": Entry(100, "ka"), "b": Entry(100, "kb")})
    assert [seen[rel].key for rel in "abc"] == ["ka", None, "mine"]


def test_files_changed_since_their_upload_start_early_but_manifests_never_do() -> None:
    local = {"metrics.jsonl": V2, "tb/ev": V1, "checkpoints/step_3/manifest.json": V2, "new": V1}
    seen = {rel: Uploaded(V1) for rel in ("metrics.jsonl", "tb/ev", "checkpoints/step_3/manifest.json")}
    assert diff.changed_since_upload(local, seen) == ["metrics.jsonl"]


def test_uncommitted_work_and_excluded_patterns_are_never_uploaded() -> None:
    assert diff.excluded("checkpoints/step_2.tmp/__0_0.distcp", [])
    assert diff.excluded("checkpoints/step_1/x.part", [])
    assert diff.excluded("logs/rank0.log", ["logs/*"])
    assert diff.excluded("deep/scratch.core", ["*.core"])  # a pattern may name the file alone
    assert not diff.excluded("checkpoints/step_1/manifest.json", ["logs/*", "*.core"])


def test_a_manifest_waits_for_its_folder_and_only_a_whole_checkpoint_is_confirmed() -> None:
    manifests = {"checkpoints/step_1/manifest.json", "checkpoints/step_2/manifest.json"}
    failed = {"checkpoints/step_2/.metadata": "boom", "metrics.jsonl": "boom"}
    assert diff.held_back(manifests, failed) == {"checkpoints/step_2/manifest.json"}
    local = [*manifests, "checkpoints/step_1/.metadata", "checkpoints/step_2/.metadata", "metrics.jsonl"]
    assert diff.confirmed_steps(local, failed) == {1}
