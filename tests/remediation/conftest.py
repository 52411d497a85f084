from tests.fleet.fixtures import fleet, small_fleet  # noqa: F401
from tests.prefect_server import prefect_api  # noqa: F401
