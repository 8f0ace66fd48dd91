"""A fresh Dagster instance per test (its own temp DAGSTER_HOME)."""

import dagster as dg
import pytest


@pytest.fixture
def instance():
    with dg.instance_for_test() as instance:
        yield instance
