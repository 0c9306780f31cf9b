"""Builds and loads the CPU decode ops (``ops.cpp``) as a plain shared library, once per machine.

The library is compiled with the system's C++ compiler (``$CXX`` or ``g++``/``c++``/``clang++``,
-O3 for this CPU, OpenMP) into ``$SPARSEFFN_CACHE/cpu_ops`` (default ~/.cache/sparseffn), under
a name that hashes the source, the flags and the CPU, so an edited source or another CPU gets
its own build and a stale one is never loaded. It takes about a second; it is loaded with
ctypes and needs no torch headers, so one source serves every torch version.

A machine without a compiler has no CPU decode path: ``load()`` raises ``CpuOpsUnavailable``
naming the fix, and ``sparseffn.dispatch`` keeps such a model on the reference path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("ops.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
#: Must equal ``sfn_abi_version()`` in ops.cpp: a library of another version is rebuilt.
ABI_VERSION = 2

_LIB: ctypes.CDLL | None = None
_ERROR: str | None = None


class CpuOpsUnavailable(RuntimeError):
    """The CPU decode ops could not be built or loaded here (the message says why and the fix)."""


def cache_dir() -> Path:
    root = os.environ.get("SPARSEFFN_CACHE") or Path.home() / ".cache" / "sparseffn"
    return Path(root) / "cpu_ops"


def compiler() -> str | None:
    """The C++ compiler to build with: ``$CXX`` or the first of g++, c++, clang++ on PATH."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def library_path(cxx: str) -> Path:
    key = hashlib.sha256("\0".join(
        [SOURCE.read_text(), cxx, *FLAGS, _cpu_signature(), str(ABI_VERSION)]).encode())
    return cache_dir() / f"sparseffn_cpu_ops_{key.hexdigest()[:16]}.so"


def _build(cxx: str, target: Path, source: Path = SOURCE) -> None:
    """Compile ``source`` (the ops by default; ``bench.cpu.ops`` builds other revisions of them)
    into ``target``; raises CpuOpsUnavailable with the compiler's message if it fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # A per-process temporary name, renamed into place: two processes never see half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cxx, *FLAGS, "-o", tmp, str(source)], capture_output=True,
                              text=True, timeout=300)
        if done.returncode != 0:
            raise CpuOpsUnavailable(
                f"building the CPU decode ops with {cxx} failed:\n{done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> None:
    i64, i32, p = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.sfn_abi_version.restype = i32
    lib.sfn_input_sparse.argtypes = [i64, i64, i64, p, p, i64, i32, p, i64, p, i64, p, i64, p,
                                     i32]
    lib.sfn_output_sparse.argtypes = [i64, i64, i64, p, p, i64, i32, p, i64, p, i32]
    lib.sfn_gated_mlp.argtypes = [i64, i64, i64, p, p, p, p, i32, p, i64, p, i64, i32, p, p, p,
                                  i32]
    for fn in (lib.sfn_input_sparse, lib.sfn_output_sparse, lib.sfn_gated_mlp):
        fn.restype = None


def load() -> ctypes.CDLL:
    """The loaded library, built first if this machine has no current build.

    Raises:
        CpuOpsUnavailable: no C++ compiler, or the build failed (the error is kept, so a
            failed build is not retried on every call).
    """
    global _LIB, _ERROR
    if _LIB is not None:
        return _LIB
    if _ERROR is not None:
        raise CpuOpsUnavailable(_ERROR)
    try:
        cxx = compiler()
        if cxx is None:
            raise CpuOpsUnavailable(
                "no C++ compiler found (tried $CXX, g++, c++, clang++): the CPU decode path "
                "needs one once, to build its ops (e.g. `apt-get install g++`); until then "
                "sparse models run the reference path on the CPU")
        path = library_path(cxx)
        if not path.exists():
            _build(cxx, path)
        import torch  # noqa: F401  (loads torch's OpenMP runtime first, which the ops then share)
        lib = ctypes.CDLL(str(path))
        _declare(lib)
        if lib.sfn_abi_version() != ABI_VERSION:
            raise CpuOpsUnavailable(f"{path} has ABI {lib.sfn_abi_version()}, expected "
                                    f"{ABI_VERSION}; delete it to rebuild")
    except CpuOpsUnavailable as e:
        _ERROR = str(e)
        raise
    _LIB = lib
    return lib


def available() -> bool:
    """Whether the CPU decode ops load here (building them first if needed)."""
    try:
        load()
        return True
    except CpuOpsUnavailable:
        return False


def unavailable_reason() -> str | None:
    """Why ``available()`` is False (None when it is True)."""
    return None if available() else _ERROR
