"""CPU, memory and GPU over time, downsampled as the samples stream past.

A sandbox samples every few seconds, so a day-long one has tens of thousands of samples, and a run
has a sandbox per episode. Each sandbox's series keeps at most `limits.points` points: once full,
neighbouring points are merged pairwise and every later point stands for twice as many samples (the
stride doubles). Memory is bounded by the point count, whatever the number of samples, and the
points stay evenly spaced in samples. A merged point keeps the mean CPU (what the sandbox used) and
the peaks (what a chart must not hide: a miner's burst, the memory high-water mark)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from corral.report import _fields as f
from corral.report._model import Limits, ResourcePoint
from corral.store.records import StoredEvent


class _Point:
    __slots__ = ("cpu_peak", "cpu_sum", "gpu_memory", "gpu_sm", "memory", "processes", "samples", "time")

    def __init__(self, time: datetime) -> None:
        self.time = time
        self.samples = 0
        self.cpu_sum = 0.0
        self.cpu_peak = 0.0
        self.memory = 0
        self.processes = 0
        self.gpu_memory = 0
        self.gpu_sm = 0.0

    def add(self, cpu: float, memory: int, processes: int, gpu_memory: int, gpu_sm: float) -> None:
        self.samples += 1
        self.cpu_sum += cpu
        self.cpu_peak = max(self.cpu_peak, cpu)
        self.memory = max(self.memory, memory)
        self.processes = max(self.processes, processes)
        self.gpu_memory = max(self.gpu_memory, gpu_memory)
        self.gpu_sm = max(self.gpu_sm, gpu_sm)

    def merge(self, later: _Point) -> None:
        self.samples += later.samples
        self.cpu_sum += later.cpu_sum
        self.cpu_peak = max(self.cpu_peak, later.cpu_peak)
        self.memory = max(self.memory, later.memory)
        self.processes = max(self.processes, later.processes)
        self.gpu_memory = max(self.gpu_memory, later.gpu_memory)
        self.gpu_sm = max(self.gpu_sm, later.gpu_sm)

    def frozen(self) -> ResourcePoint:
        return ResourcePoint(
            time=self.time,
            samples=self.samples,
            cpu=self.cpu_sum / self.samples if self.samples else 0.0,
            cpu_peak=self.cpu_peak,
            memory=self.memory,
            processes=self.processes,
            gpu_memory=self.gpu_memory,
            gpu_sm=self.gpu_sm,
        )


class Series:
    """One sandbox's samples, downsampled to at most `points` points."""

    def __init__(self, points: int) -> None:
        self._max = max(2, points)
        self._points: list[_Point] = []
        self._stride = 1  # samples per point from now on
        self.samples = 0

    def add(self, time: datetime, body: Mapping[str, Any]) -> None:
        self.samples += 1
        last = self._points[-1] if self._points else None
        if last is None or last.samples >= self._stride:
            if len(self._points) >= self._max:
                self._halve()
            last = _Point(time)
            self._points.append(last)
        gpu_memory = 0
        gpu_sm = 0.0
        gpus = body.get("gpu")
        if isinstance(gpus, list):
            for g in gpus:
                if isinstance(g, Mapping):
                    gpu_memory += f.integer(g, "memory")
                    gpu_sm = max(gpu_sm, f.number(g, "sm"))
        last.add(
            f.number(body, "cpu"), f.integer(body, "memory"), f.integer(body, "processes"), gpu_memory, gpu_sm
        )

    def _halve(self) -> None:
        merged: list[_Point] = []
        for i in range(0, len(self._points), 2):
            point = self._points[i]
            if i + 1 < len(self._points):
                point.merge(self._points[i + 1])
            merged.append(point)
        self._points = merged
        self._stride *= 2

    def points(self) -> list[ResourcePoint]:
        return [p.frozen() for p in self._points]


def resource_series(
    events: Iterable[StoredEvent], limits: Limits | None = None
) -> dict[str, list[ResourcePoint]]:
    """Sandbox id -> its resource.sample events as at most `limits.points` points, oldest first."""
    points = (limits or Limits()).points
    series: dict[str, Series] = {}
    for e in events:
        if e.type == "resource.sample":
            s = series.get(e.sandbox)
            if s is None:
                s = series[e.sandbox] = Series(points)
            s.add(e.time, e.body)
    return {sandbox: s.points() for sandbox, s in series.items()}
