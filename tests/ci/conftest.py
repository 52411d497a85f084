import pytest

from tests.fleet.fixtures import fleet, small_fleet  # noqa: F401
from tests.prefect_server import prefect_api  # noqa: F401


@pytest.fixture
def clean_small(small_fleet, prefect_api, ferry_home):  # noqa: F811
    """The 12-host fleet with empty deploy roots, a Prefect server and a fresh Ferry home."""
    small_fleet.wipe()
    yield small_fleet
    small_fleet.wipe()
