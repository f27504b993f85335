"""The launcher tests' fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.launcher.deployment_helpers import Processes


@pytest.fixture
def processes() -> Iterator[Processes]:
    """Processes a REAL deployment test starts; all stopped at the end, whatever happened."""
    started = Processes()
    try:
        yield started
    finally:
        started.stop_all()
