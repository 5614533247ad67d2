"""Shared fixtures: one Ray instance per test session, limited to 2 CPUs."""

import os

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray shared by every test that needs one (starting Ray costs seconds)."""
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, log_to_driver=True)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path):
    """A fresh SQLite MLflow store for one test."""
    return f"sqlite:///{tmp_path}/mlflow.db"
