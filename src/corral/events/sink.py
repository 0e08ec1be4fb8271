"""Where events go: each one written and flushed as it happens, so a crash loses none."""

from __future__ import annotations

import os
import threading

from pydantic import BaseModel


class JsonlSink:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the sink

    def write(self, event: BaseModel) -> None:
        self.write_json(event.model_dump_json())

    def write_json(self, text: str) -> None:
        line = text + "\n"
        with self._lock:
            if self._file.closed:
                return  # the sandbox is gone: a monitor's late report has nowhere to go
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
