"""Run and sweep names derived from the command-line overrides: stable, filesystem-safe, clock-free."""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

_UNSAFE = re.compile(r"[^A-Za-z0-9_.,=+-]")
MAX_LEN = 120
#: Config keys whose values are secrets: redacted in logs and saved configs, and kept out of run names.
SECRET_KEY = re.compile(
    r"(secret|password|passwd|token|credential|access_key|api_key|private_key|session_key)", re.IGNORECASE
)
# Where a new override starts in Hydra's comma-joined override_dirname (values may contain commas).
_OVERRIDE_START = re.compile(r"^[+~]*[A-Za-z_][\w.@/-]*=")


REDACTED = "***"


def redact(obj: Any) -> Any:
    """A copy with every value under a secret-looking key replaced by ``***``."""
    if isinstance(obj, dict):
        return {
            k: (REDACTED if SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v)) for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def redact_overrides(overrides: list[str]) -> list[str]:
    """Command-line overrides with the value of any that mentions a secret replaced by ``***``.

    NOTE: the whole override is searched, not just its key: ``storage.client_kwargs={api_token: x}``.
    """
    return [o if not SECRET_KEY.search(o) else f"{o.split('=', 1)[0]}={REDACTED}" for o in overrides]


def without_secrets(items: list[str]) -> list[str]:
    """Drop every override that mentions a secret-looking key, in its key or inside a dict value.

    The name becomes a directory, log lines and a remote prefix: a secret must not end up there. Dropping
    (rather than hashing) is safe for resuming: credentials do not change what is trained.
    """
    return [item for item in items if not SECRET_KEY.search(item)]


def _split_overrides(override_dirname: str) -> list[str]:
    items: list[str] = []
    for piece in override_dirname.split(","):
        if items and not _OVERRIDE_START.match(piece):
            items[-1] = f"{items[-1]},{piece}"  # a comma inside a value such as {a: 1, b: 2}
        else:
            items.append(piece)
    return items


def safe(text: str) -> str:
    name = _UNSAFE.sub("_", text.replace("/", "_")).strip("._,")
    name = name.replace("..", "_")
    if len(name) > MAX_LEN:  # Keep it readable and unique: a prefix plus a hash of the whole.
        name = f"{name[: MAX_LEN - 13]}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    return name or "default"


#: A value that fits in a name: characters a path keeps readable once ``/`` and ``:`` become ``_``, and short.
_PLAIN_VALUE = re.compile(r"^[A-Za-z0-9_.,=+\-/:()\[\]]*$")
MAX_VALUE_LEN = 40


def readable(item: str) -> str:
    """``key=value``, with a value that does not fit a name (a structure, spaces, quotes, or longer than
    ``MAX_VALUE_LEN``) replaced by a short stable digest of it: ``key=hash-<10 hex>``."""
    key, sep, value = item.partition("=")
    if not sep or (_PLAIN_VALUE.match(value) and len(value) <= MAX_VALUE_LEN):
        return item
    return f"{key}=hash-{hashlib.sha256(value.encode()).hexdigest()[:10]}"


def run_name(override_dirname: str) -> str:
    """``model=vitb16,opt.lr=0.001`` style, or ``default`` with no overrides."""
    items = without_secrets([i.lstrip("+~") for i in _split_overrides(override_dirname)]) if override_dirname else []
    return safe(",".join(readable(i) for i in items)) if items else "default"


def sweep_name(task_overrides: list[str], exclude_keys: list[str] | None = None) -> str:
    excluded = set(exclude_keys or [])
    kept = sorted(
        readable(o.lstrip("+~"))
        for o in without_secrets(task_overrides)
        if o.split("=", 1)[0].lstrip("+~") not in excluded
    )
    return safe(",".join(kept)) if kept else "default"


def remove_if_empty(run_dir: str, stop_at: str) -> None:
    """Undo Hydra's mkdir of the run directory (and empty parents) when a run is rejected before work."""
    path, stop = os.path.abspath(run_dir), os.path.abspath(stop_at)
    while path.startswith(stop + os.sep) and os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)
        path = os.path.dirname(path)
