"""Shared fixtures: tiny random-weight HF models written on the fly."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    # Everything under tests/e2e is end-to-end: mark it so `-m "not e2e"` gives the fast tier.
    for item in items:
        if "/tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)
