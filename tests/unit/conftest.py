"""Unit tests never start Ray: a module after which Ray runs, where it did not before, fails."""

import sys

import pytest


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.fixture(scope="module", autouse=True)
def no_ray_started():
    before = _ray_running()  # a whole-suite run may share a Ray that tests/e2e started
    yield
    assert before or not _ray_running(), "a unit test started Ray; it belongs in tests/e2e"
