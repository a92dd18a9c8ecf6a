"""The fault-injection suite: every test in this folder carries the ``faults`` marker, so it runs
apart (``pytest -m faults``) or is left out (``pytest -m "not faults"``); the whole test command
runs it too."""
from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.faults)
