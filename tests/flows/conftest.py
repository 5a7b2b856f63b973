"""Prefect for the flow tests: a private home (nothing read from or written to ~/.prefect), no analytics, and one
test harness (a temporary server on SQLite) shared by the session: it takes 10-20 s to start here."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

# Before prefect is imported anywhere: its settings are read once.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="cirflow-prefect-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
