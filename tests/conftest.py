"""Test-suite settings: the tier markers (integration, e2e) by directory, and the hypothesis
profile for CI."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# CI runs property tests on a fixed example sequence, so a red CI is reproducible; developers
# still get fresh random examples locally.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


TIERS = {"/tests/integration/": pytest.mark.integration, "/tests/e2e/": pytest.mark.e2e}


def pytest_collection_modifyitems(config, items):
    # A test's tier is its directory: `-m "not integration and not e2e"` gives the fast unit tier.
    for item in items:
        path = str(item.fspath)
        for directory, marker in TIERS.items():
            if directory in path:
                item.add_marker(marker)


# Shared fixtures: real etcd / NATS servers on free loopback ports (tests/infra_servers.py) and
# the multi-host test bed (tests/netns_fixtures.py, root only).
pytest_plugins = ["tests.infra_servers", "tests.netns_fixtures"]
