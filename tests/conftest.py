"""pytest fixtures shared by every test file; plain helpers live in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import FIXTURE


@pytest.fixture(scope="session")
def fixture_path() -> Path:
    return FIXTURE
