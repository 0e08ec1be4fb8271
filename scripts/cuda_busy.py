"""A small CUDA workload with nothing but the driver: ctypes calls into libcuda.so.1 and a PTX kernel
that spins on the SMs. `scripts/gpu-check` copies it into sandboxes (no torch, cupy or nvcc there).

    python3 cuda_busy.py probe         cuInit, first device, a context: 0 when CUDA works
    python3 cuda_busy.py run SECONDS   keep every SM busy for SECONDS, in launches of 25 to 50 ms

It runs under any python3 (3.8+) and imports only the standard library. Every CUresult is checked;
a failure prints the call and the error's name (cuGetErrorName), e.g.
``cuda: cuInit failed: CUDA_ERROR_NO_DEVICE (100)``. Exit codes: 0 CUDA worked, 1 a CUDA call
failed, 2 usage, 3 libcuda.so.1 could not be loaded at all.
"""

from __future__ import annotations

import ctypes
import sys
import time
from typing import Any

# Each thread runs `iters` dependent fused multiply-adds and stores the result, so the JIT can't drop
# the loop. PTX ISA 6.0 for sm_50: every driver since CUDA 9 compiles it for its own GPU.
PTX = b"""
.version 6.0
.target sm_50
.address_size 64

.visible .entry spin(
    .param .u64 out,
    .param .u32 iters
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    .reg .f32 %f<2>;
    .reg .b64 %rd<4>;

    ld.param.u64 %rd0, [out];
    ld.param.u32 %r0, [iters];
    mov.u32 %r1, %tid.x;
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mad.lo.u32 %r4, %r2, %r3, %r1;
    cvt.rn.f32.u32 %f0, %r4;
    mov.u32 %r5, 0;
LOOP:
    fma.rn.f32 %f0, %f0, 0f3F7FFFEF, 0f3F800000;
    add.u32 %r5, %r5, 1;
    setp.lt.u32 %p0, %r5, %r0;
    @%p0 bra LOOP;
    cvta.to.global.u64 %rd1, %rd0;
    mul.wide.u32 %rd2, %r4, 4;
    add.u64 %rd3, %rd1, %rd2;
    st.global.f32 [%rd3], %f0;
    ret;
}
"""

THREADS = 256  # per block
BLOCKS_PER_SM = 4
LAUNCH_SECONDS = 0.05  # short launches: the process stops promptly and no watchdog ever fires
CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16
CU_JIT_ERROR_LOG_BUFFER = 5
CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES = 6

c_int_p = ctypes.POINTER(ctypes.c_int)
c_void_pp = ctypes.POINTER(ctypes.c_void_p)


class CudaError(Exception):
    def __init__(self, call: str, code: int, name: str) -> None:
        super().__init__(f"{call} failed: {name} ({code})")
        self.code = code
        self.name = name


def load() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    signatures: dict[str, list[Any]] = {
        "cuGetErrorName": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
        "cuInit": [ctypes.c_uint],
        "cuDriverGetVersion": [c_int_p],
        "cuDeviceGetCount": [c_int_p],
        "cuDeviceGet": [c_int_p, ctypes.c_int],
        "cuDeviceGetName": [ctypes.c_char_p, ctypes.c_int, ctypes.c_int],
        "cuDeviceGetAttribute": [c_int_p, ctypes.c_int, ctypes.c_int],
        "cuCtxCreate_v2": [c_void_pp, ctypes.c_uint, ctypes.c_int],
        "cuCtxDestroy_v2": [ctypes.c_void_p],
        "cuCtxSynchronize": [],
        "cuMemAlloc_v2": [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t],
        "cuMemFree_v2": [ctypes.c_uint64],
        "cuModuleLoadDataEx": [c_void_pp, ctypes.c_char_p, ctypes.c_uint, c_int_p, c_void_pp],
        "cuModuleUnload": [ctypes.c_void_p],
        "cuModuleGetFunction": [c_void_pp, ctypes.c_void_p, ctypes.c_char_p],
        "cuLaunchKernel": [
            ctypes.c_void_p,  # CUfunction
            ctypes.c_uint,  # grid x
            ctypes.c_uint,  # grid y
            ctypes.c_uint,  # grid z
            ctypes.c_uint,  # block x
            ctypes.c_uint,  # block y
            ctypes.c_uint,  # block z
            ctypes.c_uint,  # shared memory bytes
            ctypes.c_void_p,  # stream (NULL: the default stream)
            c_void_pp,  # kernel parameters: one pointer to each argument
            c_void_pp,  # extra
        ],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int  # CUresult
    return lib


class Cuda:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib

    def __call__(self, name: str, *args: object) -> None:
        code = getattr(self.lib, name)(*args)
        if code != 0:
            text = ctypes.c_char_p()
            if self.lib.cuGetErrorName(code, ctypes.byref(text)) != 0 or not text.value:
                raise CudaError(name, code, "unknown CUresult")
            raise CudaError(name, code, text.value.decode())


def open_device(cuda: Cuda) -> tuple[ctypes.c_void_p, str, int]:
    """cuInit, device 0, a context on it: (context, device name, multiprocessor count)."""
    cuda("cuInit", 0)
    version = ctypes.c_int()
    cuda("cuDriverGetVersion", ctypes.byref(version))
    count = ctypes.c_int()
    cuda("cuDeviceGetCount", ctypes.byref(count))
    if count.value < 1:
        raise CudaError("cuDeviceGetCount", 100, "no device (count 0)")
    dev = ctypes.c_int()
    cuda("cuDeviceGet", ctypes.byref(dev), 0)
    name = ctypes.create_string_buffer(256)
    cuda("cuDeviceGetName", name, len(name), dev)
    sms = ctypes.c_int()
    cuda("cuDeviceGetAttribute", ctypes.byref(sms), CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev)
    ctx = ctypes.c_void_p()
    cuda("cuCtxCreate_v2", ctypes.byref(ctx), 0, dev)
    v = version.value
    device = name.value.decode(errors="replace")
    label = f"{device}, {sms.value} SMs, CUDA driver API {v // 1000}.{v % 1000 // 10}"
    return ctx, label, sms.value


def load_kernel(cuda: Cuda) -> tuple[ctypes.c_void_p, ctypes.c_void_p]:
    module = ctypes.c_void_p()
    log = ctypes.create_string_buffer(8192)
    options = (ctypes.c_int * 2)(CU_JIT_ERROR_LOG_BUFFER, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES)
    values = (ctypes.c_void_p * 2)(ctypes.cast(log, ctypes.c_void_p), ctypes.c_void_p(len(log)))
    try:
        cuda("cuModuleLoadDataEx", ctypes.byref(module), PTX, 2, options, values)
    except CudaError as e:
        jit_log = log.value.decode(errors="replace").strip()
        raise CudaError(f"cuModuleLoadDataEx (JIT log: {jit_log!r})", e.code, e.name) from None
    func = ctypes.c_void_p()
    cuda("cuModuleGetFunction", ctypes.byref(func), module, b"spin")
    return module, func


def run(cuda: Cuda, seconds: float) -> None:
    ctx, label, sms = open_device(cuda)
    module, func = load_kernel(cuda)
    blocks = max(1, sms) * BLOCKS_PER_SM
    buf = ctypes.c_uint64()
    cuda("cuMemAlloc_v2", ctypes.byref(buf), blocks * THREADS * 4)
    out = ctypes.c_uint64(buf.value)
    iters = ctypes.c_uint32(1 << 14)
    params = (ctypes.c_void_p * 2)(ctypes.addressof(out), ctypes.addressof(iters))

    def launch() -> float:
        start = time.monotonic()
        cuda("cuLaunchKernel", func, blocks, 1, 1, THREADS, 1, 1, 0, None, params, None)
        cuda("cuCtxSynchronize")
        return time.monotonic() - start

    # Grow the loop until one launch takes about LAUNCH_SECONDS on this GPU.
    took = launch()
    while took < LAUNCH_SECONDS / 2 and iters.value < 1 << 28:
        iters.value *= 2
        took = launch()
    print(f"cuda: running on {label}: {blocks}x{THREADS} threads, {took * 1000:.0f} ms a launch", flush=True)
    launches = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        launch()
        launches += 1
    cuda("cuMemFree_v2", buf)
    cuda("cuModuleUnload", module)
    cuda("cuCtxDestroy_v2", ctx)
    print(f"cuda: done: {launches} launches in {seconds:g} s", flush=True)


def main(argv: list[str]) -> int:
    if not (argv[1:2] == ["probe"] and len(argv) == 2) and not (argv[1:2] == ["run"] and len(argv) == 3):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        lib = load()
    except (OSError, AttributeError) as e:
        print(f"cuda: libcuda.so.1 could not be loaded: {e}", flush=True)
        return 3
    cuda = Cuda(lib)
    try:
        if argv[1] == "probe":
            ctx, label, _ = open_device(cuda)
            cuda("cuCtxDestroy_v2", ctx)
            print(f"cuda: ok: {label}", flush=True)
        else:
            run(cuda, float(argv[2]))
    except CudaError as e:
        print(f"cuda: {e}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
