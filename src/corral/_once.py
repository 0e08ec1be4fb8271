"""One shared instance per process, for the egress event loop and its lookup workers until the
fence takes them from its `Host` (which owns every other helper sandboxes share)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def process_wide(factory: Callable[[], T]) -> Callable[[], T]:
    """A getter returning one `factory()` for the whole process, made on first use by whichever
    thread gets there first."""
    lock = threading.Lock()
    made: list[T] = []

    def get() -> T:
        with lock:
            if not made:
                made.append(factory())
            return made[0]

    return get
