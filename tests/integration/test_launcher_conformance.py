"""Hydra's own launcher conformance suites, run against ``hydra/launcher=pool`` (issue 14, acceptance 7),
as hydra-submitit-launcher runs them against its launchers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite

from hydra_plugins.runner_pool.pool_launcher import PoolLauncher
from tests.helpers.hydra_suites import unspecified_version_base

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _fresh_version_base() -> Iterator[None]:
    # NOTE: a test before this one may have set Hydra's version base (see tests/helpers/hydra_suites.py).
    with unspecified_version_base():
        yield


def test_discovery() -> None:
    assert PoolLauncher.__name__ in [x.__name__ for x in Plugins.instance().discover(Launcher)]


@pytest.mark.parametrize("launcher_name, overrides", [("runner_pool", ["hydra.launcher.slots=2"])])
class TestPoolLauncher(LauncherTestSuite):
    pass


@pytest.mark.parametrize(
    "task_launcher_cfg, extra_flags",
    [({}, ["-m", "hydra/hydra_logging=disabled", "hydra/job_logging=disabled", "hydra/launcher=runner_pool"])],
)
class TestPoolLauncherIntegration(IntegrationTestSuite):
    pass
