"""Fixtures of the chaos suite (helpers live in chaos_helpers.py)."""

from __future__ import annotations

import pytest

from chaos_helpers import PrivateRedis


@pytest.fixture
def private_redis():
    """A Redis of this test alone (unix socket, no persistence); stopped afterwards."""
    r = PrivateRedis()
    r.start()
    yield r
    r.stop()
