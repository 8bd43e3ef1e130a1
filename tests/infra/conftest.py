import pytest


@pytest.fixture(scope="module")
def real_stack():
    """Real Postgres + MLflow server + Prefect server on loopback ports (tests/infra/stack.py).

    Skips, saying what is missing, where PostgreSQL or a database driver is not installed
    (scripts/ci-services.sh installs PostgreSQL; the drivers come with the Python dependencies).
    """
    from tests.infra.stack import StackUnavailable, check_drivers, find_pg_bin, real_stack

    try:
        find_pg_bin()
        check_drivers()
    except StackUnavailable as exc:
        pytest.skip(str(exc))
    with real_stack() as stack:
        yield stack
