"""GpuMonitor on the fake NVML (tests/fakenvml.py), and on the real pynvml of whatever host this is."""

from __future__ import annotations

import ctypes
import importlib
import inspect
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from corral.monitors.gpu import GpuDevice, GpuError, GpuMonitor, GpuProcessUsage
from corral.monitors.resource import Sampler
from fakenvml import NVML_ERROR_DRIVER_NOT_LOADED, NVML_SUCCESS, FakeNvml

GiB = 1 << 30
ROOT = Path(__file__).resolve().parent.parent
CUDA_BUSY = ROOT / "scripts" / "cuda_busy.py"


def test_no_library_means_unavailable_with_a_reason() -> None:
    nvml = FakeNvml()
    nvml.library_missing = True
    mon = GpuMonitor(nvml)
    assert mon.available() is False
    assert mon.reason == "libnvidia-ml.so.1 was not found: no NVIDIA driver is installed on this host"
    assert mon.sample() == []
    assert mon.devices() == []
    assert mon.driver_version() == ""
    mon.close()
    assert "nvmlShutdown" not in nvml.calls  # nothing was initialised, nothing to shut down
    assert nvml.calls == ["nvmlInit"]  # tried once, not on every call


def test_driver_not_loaded_is_unavailable_with_its_own_reason() -> None:
    nvml = FakeNvml()
    nvml.init_error = NVML_ERROR_DRIVER_NOT_LOADED
    mon = GpuMonitor(nvml)
    assert not mon.available()
    assert mon.reason == "the NVIDIA kernel driver is not loaded (NVML: Driver Not Loaded)"


def test_missing_bindings_are_unavailable_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now raises ImportError
    mon = GpuMonitor()
    assert not mon.available()
    assert mon.reason is not None
    assert mon.reason.startswith("the NVML bindings are not installed (")
    assert mon.reason.endswith("); install nvidia-ml-py")


def test_processes_on_two_gpus() -> None:
    nvml = FakeNvml()
    gpu0 = nvml.add_device(uuid="GPU-aaaa")
    gpu1 = nvml.add_device(uuid="GPU-bbbb")
    busy = gpu0.add_process(100, memory=GiB, sm=60)
    gpu0.add_process(101, memory=GiB // 2, sm=0)  # holds a context, runs nothing
    gpu1.add_process(200, memory=None, sm=30)  # NVML can't say how much memory
    gpu1.add_process(201, memory=3 * GiB, sm=5, compute=True, graphics=True)
    gpu1.add_process(100, memory=GiB, sm=10)  # one process on both GPUs
    nvml.tick()
    busy.sm = 95
    nvml.tick()

    with GpuMonitor(nvml) as mon:
        assert mon.available() and mon.reason is None
        assert mon.sample() == [
            GpuProcessUsage(0, "GPU-aaaa", 100, GiB, 95.0),  # the busiest sample in the interval
            GpuProcessUsage(0, "GPU-aaaa", 101, GiB // 2, 0.0),
            GpuProcessUsage(1, "GPU-bbbb", 100, GiB, 10.0),
            GpuProcessUsage(1, "GPU-bbbb", 200, None, 30.0),
            GpuProcessUsage(1, "GPU-bbbb", 201, 3 * GiB, 5.0),  # on both lists, counted once
        ]


def test_each_sample_covers_only_the_interval_since_the_last() -> None:
    nvml = FakeNvml()
    gpu = nvml.add_device()
    proc = gpu.add_process(100, sm=90)
    nvml.tick()
    mon = GpuMonitor(nvml)
    assert [u.sm_percent for u in mon.sample()] == [90.0]
    # The driver took no sample since: no utilisation for this interval, but the process is listed.
    assert mon.sample() == [GpuProcessUsage(0, gpu.uuid, 100, 256 << 20, None)]
    proc.sm = 20
    nvml.tick()
    assert [u.sm_percent for u in mon.sample()] == [20.0]  # not the old 90


def test_utilisation_missing() -> None:
    nvml = FakeNvml()
    gpu = nvml.add_device()
    gpu.utilization_supported = False  # MIG mode, older boards
    gpu.graphics_supported = False
    gpu.add_process(100, memory=GiB, sm=80)
    nvml.tick()
    mon = GpuMonitor(nvml)
    assert mon.sample() == [GpuProcessUsage(0, gpu.uuid, 100, GiB, None)]


def test_empty_sample_buffer_reported_as_success_is_no_utilisation() -> None:
    # pynvml raises NVMLError(NVML_SUCCESS) when the driver's size query finds no samples at all.
    nvml = FakeNvml()
    gpu = nvml.add_device()
    gpu.add_process(100, sm=80)
    nvml.tick()
    nvml.utilization_error = NVML_SUCCESS
    assert [u.sm_percent for u in GpuMonitor(nvml).sample()] == [None]


def test_process_that_exits_between_the_list_and_the_utilisation_query() -> None:
    nvml = FakeNvml()
    gpu = nvml.add_device()
    gpu.add_process(100, sm=70)
    gpu.add_process(101, sm=40)
    nvml.tick()
    nvml.before["nvmlDeviceGetProcessUtilization"] = lambda: nvml.exit_process(100)
    mon = GpuMonitor(nvml)
    # It was listed, so it has its entry, with what the driver sampled before it went.
    assert [(u.pid, u.sm_percent) for u in mon.sample()] == [(100, 70.0), (101, 40.0)]
    del nvml.before["nvmlDeviceGetProcessUtilization"]
    nvml.tick()
    assert [(u.pid, u.sm_percent) for u in mon.sample()] == [(101, 40.0)]


def test_only_process_exits_before_it_was_ever_sampled() -> None:
    nvml = FakeNvml()
    gpu = nvml.add_device()
    gpu.add_process(100, sm=70)
    nvml.before["nvmlDeviceGetProcessUtilization"] = lambda: nvml.exit_process(100)
    assert [(u.pid, u.sm_percent) for u in GpuMonitor(nvml).sample()] == [(100, None)]


def test_shutdown() -> None:
    nvml = FakeNvml()
    nvml.add_device().add_process(100)
    mon = GpuMonitor(nvml)
    assert mon.sample() != []
    assert nvml.refcount == 1
    mon.close()
    assert nvml.calls.count("nvmlShutdown") == 1
    assert nvml.refcount == 0
    assert not mon.available() and mon.reason == "closed"
    assert mon.sample() == []
    mon.close()  # idempotent
    assert nvml.calls.count("nvmlShutdown") == 1


def test_context_manager_shuts_down() -> None:
    nvml = FakeNvml()
    with GpuMonitor(nvml) as mon:
        assert mon.available()
    assert nvml.refcount == 0


def test_a_gpu_that_fails_raises_naming_it() -> None:
    nvml = FakeNvml()
    nvml.add_device()
    nvml.add_device().lost = True
    with pytest.raises(
        GpuError, match=r"^GPU 1: nvmlDeviceGetHandleByIndex failed: GPU is lost \(NVML error 15\)$"
    ):
        GpuMonitor(nvml).sample()


def watch_until_failed(
    sampler: Sampler, keys: list[str], calls: dict[str, int], gpu: tuple[str, ...] = ()
) -> dict[str, str]:
    failed: dict[str, str] = {}
    done = threading.Event()

    def watch(key: str) -> None:
        def callback(usage: object) -> None:
            calls[key] = calls.get(key, 0) + 1
            if key == "broken":
                raise RuntimeError("a bug in one sandbox's sampling")

        def on_failure(reason: str) -> None:
            failed[key] = reason
            done.set()

        sampler.watch(key, 0.02, callback, on_failure, gpu=key in gpu)

    for key in keys:
        watch(key)
    assert done.wait(10), "no failure reported"
    return failed


def test_a_gpu_that_fails_stops_the_sandboxes_it_was_sampling(caplog: pytest.LogCaptureFixture) -> None:
    # Blind on a GPU, the tripwires would read "no processes" there: failed closed, as when the
    # process monitor or the sampler itself fails.
    nvml = FakeNvml()
    nvml.add_device().lost = True
    sampler = Sampler(GpuMonitor(nvml))
    calls: dict[str, int] = {}
    with caplog.at_level(logging.ERROR, logger="corral"):
        failed = watch_until_failed(sampler, ["a", "no-gpu"], calls, gpu=("a",))
        # A sandbox granted no GPU holds no GPU device: it is sampled on, without GPU processes.
        deadline = time.monotonic() + 5
        while calls.get("no-gpu", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    sampler.unwatch("no-gpu")
    reason = "GPU sampling failed: GPU 0: nvmlDeviceGetHandleByIndex failed: GPU is lost (NVML error 15)"
    assert failed == {"a": reason} and "a" not in calls and calls["no-gpu"] >= 3
    assert {r.name for r in caplog.records} == {"corral.monitors.resource"}
    assert caplog.records[0].getMessage() == reason


def test_a_sandbox_whose_sampling_fails_is_stopped_alone(caplog: pytest.LogCaptureFixture) -> None:
    sampler = Sampler(GpuMonitor(FakeNvml()))
    calls: dict[str, int] = {}
    with caplog.at_level(logging.ERROR, logger="corral"):
        failed = watch_until_failed(sampler, ["broken", "fine"], calls)
        before = calls.get("fine", 0)
        deadline = time.monotonic() + 5
        while calls.get("fine", 0) < before + 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    sampler.unwatch("fine")
    assert failed == {"broken": 'sampling failed: RuntimeError("a bug in one sandbox\'s sampling")'}
    assert calls["broken"] == 1 and calls["fine"] >= before + 3
    assert [r.getMessage() for r in caplog.records] == ["sampling a sandbox failed"]


def test_devices_and_driver_version() -> None:
    nvml = FakeNvml(driver_version="570.86.15")
    nvml.add_device(name="NVIDIA H100 80GB HBM3", uuid="GPU-aaaa", minor=3)
    nvml.add_device(name="NVIDIA H200", uuid="GPU-bbbb")
    nvml.devices[1].minor = None  # NVML can't say
    mon = GpuMonitor(nvml)
    assert mon.driver_version() == "570.86.15"
    assert mon.devices() == [
        GpuDevice(0, "GPU-aaaa", "NVIDIA H100 80GB HBM3", 3),
        GpuDevice(1, "GPU-bbbb", "NVIDIA H200", None),
    ]


def test_old_driver_falls_back_to_v2_process_lists() -> None:
    nvml = FakeNvml()
    nvml.old_driver = True
    gpu = nvml.add_device()
    gpu.add_process(100, sm=50)
    gpu.add_process(101, graphics=True, compute=False)
    nvml.tick()
    mon = GpuMonitor(nvml)
    assert [u.pid for u in mon.sample()] == [100, 101]
    assert [u.pid for u in mon.sample()] == [100, 101]
    # The unversioned names are tried once; after that the monitor calls the _v2 ones directly.
    assert nvml.calls.count("nvmlDeviceGetComputeRunningProcesses") == 1
    assert nvml.calls.count("nvmlDeviceGetComputeRunningProcesses_v2") == 2


def test_real_pynvml_on_this_host() -> None:
    # Most hosts (CI included) have no NVIDIA driver: the real bindings must say so, never raise.
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        has_library = False
    else:
        has_library = True
    with GpuMonitor() as mon:
        if not has_library:
            assert mon.available() is False
            assert mon.reason == "libnvidia-ml.so.1 was not found: no NVIDIA driver is installed on this host"
            assert mon.sample() == []
        elif mon.available():  # a GPU host: the real calls work end to end
            assert all(isinstance(u, GpuProcessUsage) for u in mon.sample())
            assert mon.driver_version() != ""
        else:  # the library is there but the driver is not usable
            assert mon.reason


def test_fake_has_pynvml_names_values_and_signatures() -> None:
    pynvml = importlib.import_module("pynvml")  # untyped, like everything pynvml gives GpuMonitor

    fake = FakeNvml()
    names = [n for n in dir(FakeNvml) if n.startswith(("nvml", "NVML"))]
    assert "nvmlDeviceGetProcessUtilization" in names and "NVMLError" in names
    for name in names:
        assert hasattr(pynvml, name), name
        ours, theirs = getattr(fake, name), getattr(pynvml, name)
        if isinstance(ours, int):
            assert ours == theirs, name
        elif inspect.isclass(ours):
            assert issubclass(theirs, Exception), name
        else:
            assert list(inspect.signature(ours).parameters) == list(inspect.signature(theirs).parameters), (
                name
            )
    assert pynvml.NVMLError(NVML_ERROR_DRIVER_NOT_LOADED).value == NVML_ERROR_DRIVER_NOT_LOADED


# --- scripts/cuda_busy.py (the CUDA workload gpu-check runs) on a fake libcuda -----------------------

# The driver API calls cuda_busy.py makes, checking what it passes: if its ctypes signatures or kernel
# parameters were wrong, these checks (or a crash) would say so. cuInit fails like the real one does
# without /dev/nvidiactl, unless FAKECUDA_DEVICE is set.
FAKE_LIBCUDA = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#define CHECK(c) \
    do { if (!(c)) { fprintf(stderr, "fake libcuda: check failed: %s\n", #c); exit(99); } } while (0)
static int inited;
int cuGetErrorName(int code, const char **out) {
    *out = code == 100   ? "CUDA_ERROR_NO_DEVICE"
           : code == 218 ? "CUDA_ERROR_INVALID_PTX"
                         : "CUDA_ERROR_UNKNOWN";
    return 0;
}
int cuInit(unsigned flags) {
    CHECK(flags == 0);
    if (!getenv("FAKECUDA_DEVICE") && access("/dev/nvidiactl", F_OK) != 0) return 100;
    inited = 1;
    return 0;
}
int cuDriverGetVersion(int *v) { *v = 12040; return 0; }
int cuDeviceGetCount(int *n) { CHECK(inited); *n = 1; return 0; }
int cuDeviceGet(int *d, int ordinal) { CHECK(ordinal == 0); *d = 7; return 0; }
int cuDeviceGetName(char *buf, int len, int dev) {
    CHECK(dev == 7 && len > 16);
    strcpy(buf, "Fake GPU");
    return 0;
}
int cuDeviceGetAttribute(int *v, int attr, int dev) { CHECK(dev == 7 && attr == 16); *v = 2; return 0; }
int cuCtxCreate_v2(void **ctx, unsigned flags, int dev) {
    CHECK(dev == 7 && flags == 0);
    *ctx = (void *)0x1234;
    return 0;
}
int cuCtxDestroy_v2(void *ctx) { CHECK(ctx == (void *)0x1234); return 0; }
int cuCtxSynchronize(void) { return 0; }
int cuMemAlloc_v2(uint64_t *p, size_t n) { CHECK(n == 2 * 4 * 256 * 4); *p = 0xdead0000ull; return 0; }
int cuMemFree_v2(uint64_t p) { CHECK(p == 0xdead0000ull); return 0; }
int cuModuleLoadDataEx(void **mod, const void *image, unsigned n, int *opts, void **vals) {
    CHECK(n == 2 && opts[0] == 5 && opts[1] == 6 && (uintptr_t)vals[1] >= 1024);
    CHECK(strstr((const char *)image, ".visible .entry spin(") != NULL);
    if (getenv("FAKECUDA_BAD_PTX")) { strcpy((char *)vals[0], "ptxas fatal: syntax error"); return 218; }
    *mod = (void *)0x5678;
    return 0;
}
int cuModuleUnload(void *m) { CHECK(m == (void *)0x5678); return 0; }
int cuModuleGetFunction(void **f, void *m, const char *name) {
    CHECK(m == (void *)0x5678 && strcmp(name, "spin") == 0);
    *f = (void *)0x9abc;
    return 0;
}
int cuLaunchKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned shared, void *stream, void **params, void **extra) {
    CHECK(f == (void *)0x9abc && gx == 8 && gy == 1 && gz == 1 && bx == 256 && by == 1 && bz == 1);
    CHECK(shared == 0 && stream == NULL && extra == NULL);
    CHECK(*(uint64_t *)params[0] == 0xdead0000ull);
    uint32_t iters = *(uint32_t *)params[1];
    CHECK(iters >= 16384 && (iters & (iters - 1)) == 0);
    usleep(iters / 10); /* a launch takes time in proportion to its loop */
    return 0;
}
"""


@pytest.fixture(scope="module")
def fake_libcuda(tmp_path_factory: pytest.TempPathFactory) -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed (scripts/setup installs it)")
    d = tmp_path_factory.mktemp("fakecuda")
    (d / "fake.c").write_text(FAKE_LIBCUDA)
    subprocess.run(
        [gcc, "-shared", "-fPIC", "-Wall", "-Werror", "-o", str(d / "libcuda.so.1"), str(d / "fake.c")],
        check=True,
    )
    return str(d)


def _busy(*args: str, libdir: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {"PATH": "/usr/bin:/bin", **env}
    if libdir is not None:
        environ["LD_LIBRARY_PATH"] = libdir
    return subprocess.run(
        [sys.executable, str(CUDA_BUSY), *args], capture_output=True, text=True, env=environ, timeout=60
    )


def test_cuda_busy_runs_the_kernel_on_the_driver_api(fake_libcuda: str) -> None:
    r = _busy("probe", libdir=fake_libcuda, FAKECUDA_DEVICE="1")
    assert (r.returncode, r.stdout, r.stderr) == (0, "cuda: ok: Fake GPU, 2 SMs, CUDA driver API 12.4\n", "")
    r = _busy("run", "0.3", libdir=fake_libcuda, FAKECUDA_DEVICE="1")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("cuda: running on Fake GPU, 2 SMs, CUDA driver API 12.4: 8x256 threads, ")
    assert lines[1].startswith("cuda: done: ") and lines[1].endswith(" launches in 0.3 s")


def test_cuda_busy_names_the_cuda_error(fake_libcuda: str) -> None:
    r = _busy("probe", libdir=fake_libcuda)  # no device nodes here, as in a sandbox without a grant
    assert (r.returncode, r.stdout) == (1, "cuda: cuInit failed: CUDA_ERROR_NO_DEVICE (100)\n")
    r = _busy("run", "1", libdir=fake_libcuda, FAKECUDA_DEVICE="1", FAKECUDA_BAD_PTX="1")
    assert r.returncode == 1
    assert r.stdout == (
        "cuda: cuModuleLoadDataEx (JIT log: 'ptxas fatal: syntax error') failed: "
        "CUDA_ERROR_INVALID_PTX (218)\n"
    )


def test_cuda_busy_without_libcuda_and_usage(tmp_path: Path) -> None:
    r = _busy("probe", libdir=str(tmp_path))
    if not _loadable("libcuda.so.1"):
        assert r.returncode == 3 and r.stdout.startswith("cuda: libcuda.so.1 could not be loaded: ")
    assert _busy().returncode == 2
    assert _busy("run").returncode == 2


def test_gpu_check_on_a_host_without_a_gpu() -> None:
    r = subprocess.run([str(ROOT / "scripts" / "gpu-check")], capture_output=True, text=True, timeout=60)
    if os.geteuid() != 0:
        assert (r.returncode, r.stderr) == (3, "gpu-check: run as root (corral's sandboxes need it)\n")
    elif not _loadable("libnvidia-ml.so.1"):
        # It says so, and exits with its own code rather than passing or failing.
        assert r.returncode == 2, r.stdout + r.stderr
        assert "NO GPU: libnvidia-ml.so.1 was not found" in r.stdout
        assert r.stdout.startswith("gpu-check  ")
    # On a GPU host this runs the real check, which is done by hand (it takes a minute): no assertion.


def _loadable(name: str) -> bool:
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True
