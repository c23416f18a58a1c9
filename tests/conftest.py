"""Test-suite settings: the e2e marker for tests/e2e, and the hypothesis profile for CI."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# CI runs property tests on a fixed example sequence, so a red CI is reproducible; developers
# still get fresh random examples locally.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_collection_modifyitems(config, items):
    # Everything under tests/e2e is end-to-end: mark it so `-m "not e2e"` gives the fast tier.
    for item in items:
        if "/tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


# Shared fixtures: real etcd / NATS servers on free loopback ports (tests/infra_servers.py) and
# the multi-host test bed (tests/netns_fixtures.py, root only).
pytest_plugins = ["tests.infra_servers", "tests.netns_fixtures"]
