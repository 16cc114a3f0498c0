"""Running Hydra's launcher conformance suites inside our test session.

``LauncherTestSuite`` composes in-process and expects Hydra's default working-directory behaviour for an
unspecified ``version_base`` (members chdir into ``hydra.sweep.dir/subdir``). Any earlier test of the session
that composed with ``version_base="1.3"`` leaves that in Hydra's ``VersionBase`` singleton, which the launcher
hands to its members with the rest of the singletons: chdir becomes False and the 6 tests that look for the
members' files in their sweep subdirectories fail (what issue 14 saw as "6 of 20 failing"; alone, they pass).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def unspecified_version_base() -> Iterator[None]:
    """Hydra's version base as in a fresh process, for the duration; the previous one restored after."""
    from hydra.version import _UNSPECIFIED_, VersionBase

    # NOTE: the attribute, not a new instance: VersionBase() returns the existing one (Singleton metaclass).
    base = VersionBase.instance()
    previous = base.version_base
    base.version_base = _UNSPECIFIED_
    try:
        yield
    finally:
        base.version_base = previous
