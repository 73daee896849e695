"""Fixtures shared by every test suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_fixture import start_redis, stop_redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a ``redis-server`` shared by the session; tests isolate themselves by namespace.

    Skips the test when no ``redis-server`` binary is installed. Tests that stop or restart Redis
    start their own with ``tests.redis_fixture.start_redis``.
    """
    url, proc = start_redis(Path(tmp_path_factory.mktemp("redis")))
    try:
        yield url
    finally:
        stop_redis(proc)
