"""Small helpers shared by the test modules."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(done: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll `done` until it is true or `timeout` seconds pass; teardown happens in the background."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
