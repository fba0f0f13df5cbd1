"""Shared fixtures for the engine tests."""

import pytest

from engine_helpers import Project


@pytest.fixture
def project(tmp_path) -> Project:
    (tmp_path / "runs").mkdir()
    return Project(tmp_path)
