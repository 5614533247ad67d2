"""Fixtures every test may use; Ray's are in e2e/conftest.py."""

import pytest


@pytest.fixture
def mlflow_uri(tmp_path):
    """A fresh SQLite MLflow store for one test."""
    return f"sqlite:///{tmp_path}/mlflow.db"
