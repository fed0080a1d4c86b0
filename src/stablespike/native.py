"""The CPU kernels in ``csrc/`` (renormalization of twin rows, the LIF twin difference, the
backward of 2x2 average pooling): built on first use into one library, loaded with ctypes.

Why native: per time step each is ~15-25 small tensor operations; on a CPU their dispatch (for
small tensors) or their passes over memory (for large ones), not their arithmetic, made the
Lyapunov estimate cost a large part of a training step. A kernel does the same arithmetic in one
pass per direction.

It is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``) into a per-user cache
(``$STABLESPIKE_CACHE``, else ``~/.cache/stablespike``), under a name that hashes the source and
the flags, and written atomically (concurrent ranks may build it at once). No compiler, a failed
build, or ``STABLESPIKE_NATIVE=0`` leaves :func:`kernel` returning None: callers then use the
PyTorch operations, which compute the same values.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import torch

_SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.c"))
_FLAGS = ["-O3", "-shared", "-fPIC", "-std=c99", "-fno-math-errno", "-fopenmp-simd"]
_DTYPES = {torch.float32: "f32", torch.float64: "f64"}


# Elementwise kernels over more values than this run on all of torch's threads (ctypes releases
# the GIL), in contiguous chunks: below it the hand-off costs more than it saves.
_PARALLEL_MIN_VALUES = 1 << 16


def call_elementwise(fn, n: int, args: Sequence, align: int = 1) -> None:
    """``fn(start, stop, *args)`` over ``[0, n)`` for a kernel whose elements are independent
    (or whose groups of ``align`` elements are: ranges start at multiples of ``align``), split
    into ``torch.get_num_threads()`` contiguous ranges run at once above
    ``_PARALLEL_MIN_VALUES`` values."""
    chunks = min(torch.get_num_threads(), max(1, n // _PARALLEL_MIN_VALUES), max(1, n // align))
    if chunks == 1:
        fn(0, n, *args)
        return
    bounds = [(n // align) * c // chunks * align for c in range(chunks)] + [n]
    futures = [_pool().submit(fn, bounds[c], bounds[c + 1], *args) for c in range(1, chunks)]
    fn(0, bounds[1], *args)
    for future in futures:
        future.result()


@functools.lru_cache(maxsize=None)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="stablespike")


def enabled() -> bool:
    """False when ``STABLESPIKE_NATIVE=0`` (read on every call, so tests can switch it)."""
    return os.environ.get("STABLESPIKE_NATIVE", "1") != "0"


def kernel(dtype: torch.dtype, name: str = "renorm"):
    """``(forward, backward)`` C functions ``{name}_forward_{f32|f64}`` for ``dtype`` (float32 or
    float64), or None."""
    fns = function(dtype, f"{name}_forward"), function(dtype, f"{name}_backward")
    return None if None in fns else fns


def function(dtype: torch.dtype, name: str):
    """The C function ``{name}_{f32|f64}`` for ``dtype`` (float32 or float64), or None."""
    if dtype not in _DTYPES or not enabled():
        return None
    lib = _library()
    return None if lib is None else getattr(lib, f"{name}_{_DTYPES[dtype]}")


@functools.lru_cache(maxsize=None)
def _library() -> Optional[ctypes.CDLL]:
    try:
        path = _build()
        return None if path is None else _declare(ctypes.CDLL(str(path)))
    except OSError:
        return None


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cache_dir() -> Path:
    root = os.environ.get("STABLESPIKE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "stablespike")
    return Path(root)


def _build() -> Optional[Path]:
    """Path of the compiled library, building it if this source and these flags have none yet."""
    cc = _compiler()
    if cc is None:
        return None
    source = b"".join(path.name.encode() + path.read_bytes() for path in _SOURCES)
    # a home shared by machines of other kinds: the name also says which machine and, as the
    # build targets this CPU's instruction set, which instruction set
    machine = [sys.platform, platform.machine(), _cpu_signature()]
    key = hashlib.sha256(source + " ".join([cc] + _FLAGS + machine).encode()).hexdigest()[:16]
    target = _cache_dir() / f"kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        # the CPU's own vector instructions (AVX2/AVX-512: the kernels ran 2.4x faster than with
        # the baseline SSE2), or the baseline where the compiler cannot target it
        for arch in ([_NATIVE_ARCH] if _cpu_signature() else []) + [[]]:
            done = subprocess.run([cc, *_FLAGS, *arch, "-o", tmp, *map(str, _SOURCES), "-lm"],
                                  capture_output=True, timeout=120)
            if done.returncode == 0:
                os.replace(tmp, target)  # atomic: a concurrent build finds a whole file or none
                return target
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_NATIVE_ARCH = ["-march=native"]


@functools.lru_cache(maxsize=None)
def _cpu_signature() -> str:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``), or "" where unknown: then the kernels
    are built for the baseline instruction set only."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("flags", "Features"):
                    return hashlib.sha256(line.encode()).hexdigest()[:16]
    except OSError:
        pass
    return ""


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64p, intp = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int)
    i, i64, dbl = ctypes.c_int, ctypes.c_int64, ctypes.c_double
    signatures = {
        "renorm_forward": [i, p, p, i64p, intp, i, i64, i64, p, i, dbl, dbl, p, p, p],
        "renorm_backward": [i, p, p, i64p, intp, i, i64, i64, p, i, dbl, p, p, p, p],
        "leaky_difference_forward": [i64, i64, i64, p, p, p, p, p, dbl, dbl, dbl, p, p, p, p],
        "leaky_difference_backward": [i64, i64, p, p, p, p, dbl, dbl, dbl, dbl, p, p, p],
        "avg_pool2x2_backward": [i64, i64, i64, p, p],
    }
    for name, argtypes in signatures.items():
        for suffix in _DTYPES.values():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes, fn.restype = argtypes, None
    return lib
