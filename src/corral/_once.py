"""One shared instance per process of the helpers every sandbox uses (the supervisor thread, the
egress loop, the process-event connector, the resource sampler)."""

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
