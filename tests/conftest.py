"""Shared pytest fixtures; each fixture module has one owner and one job."""

pytest_plugins = ["tests.fixtures_data", "tests.fixtures_servers"]
