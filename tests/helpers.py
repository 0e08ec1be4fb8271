"""Small helpers shared by the test modules."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from corral.runtime.host import Host


def wait_until(done: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll `done` until it is true or `timeout` seconds pass; teardown happens in the background."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@contextlib.contextmanager
def own_host(**options: Any) -> Iterator[Host]:
    """A `Host` of the test's own, shut down afterwards. Until each host has a zygote of its own,
    hosts share one, which a shutdown stops: it is started again here, so that its socket is not
    counted as the next test's leak."""
    from corral.isolation import launcher

    host = Host(**options)
    try:
        yield host
    finally:
        host.shutdown()
        launcher._get_zygote()
