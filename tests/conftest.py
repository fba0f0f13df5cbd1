"""Shared fixtures for the engine tests."""

import os

import pytest

# Two test workers share two cores: one math thread each (steps inherit it) avoids OpenMP
# threads spinning while waiting for a descheduled sibling.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from engine_helpers import Project


@pytest.fixture
def project(tmp_path) -> Project:
    (tmp_path / "runs").mkdir()
    return Project(tmp_path)
