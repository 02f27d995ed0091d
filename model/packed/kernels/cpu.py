"""The CPU kernels (`ternary_cpu.cpp`, `ternary_gemm.cpp`), compiled on first use and cached.

Two kernels: the row kernel (AVX2) for decode-sized calls, and an int8 GEMM for calls of at least
`gemm_min_rows` token rows, on the widest int8 dot product the CPU has: AMX-INT8, AVX-512 VNNI,
AVX-VNNI, else AVX2. The path is chosen at run time from the CPU (`gemm_paths()`), or forced with
`$BITLLAVA_CPU_GEMM` (a path name, or "rows" for the row kernel only); `kernel_info()` says which.

Built with `torch.utils.cpp_extension.load` (ninja, the system C++ compiler, OpenMP through
PyTorch's runtime), as DeepSpeed builds its ops: the first call compiles for about a
minute, later processes import the cached library directly. The cache lives in `$BITLLAVA_KERNEL_CACHE`,
else `$XDG_CACHE_HOME/bitllava/kernels`, else `~/.cache/bitllava/kernels`, in a folder named after
the hash of the source and flags and the torch version, so editing either or upgrading torch rebuilds.
Builds are serialised by an OS file lock (`flock`), which dies with its holder, and a dead process's
torch build lock is cleared first (`model.torch_build_lock`): left alone it makes every later `load()`
wait forever. Once built, the library is imported without torch's build check (and its lock).

When the CPU lacks AVX2 or the build fails, `load_cpu_kernels()` logs why once and returns None;
callers then use the plain PyTorch reference (`model.packed.kernels.reference`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
from functools import lru_cache
from types import ModuleType

import torch

from model.torch_build_lock import build_lock

log = logging.getLogger(__name__)
_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [os.path.join(_HERE, name) for name in ("ternary_cpu.cpp", "ternary_gemm.cpp")]
HEADERS = [os.path.join(_HERE, "ternary_gemm.h")]
# the baseline is AVX2; the AMX, AVX-512 VNNI and AVX-VNNI GEMM paths carry their own target flags (GCC
# target pragmas in ternary_gemm.cpp) and run only where the CPU has them
CFLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp")
LDFLAGS = ("-fopenmp",)
_failure: str | None = None
GEMM_ENV = "BITLLAVA_CPU_GEMM"


def cache_root() -> str:
    if os.environ.get("BITLLAVA_KERNEL_CACHE"):
        return os.environ["BITLLAVA_KERNEL_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "bitllava", "kernels")


def cpu_supports_avx2() -> bool:
    """x86-64 with AVX2 (PyTorch's own dispatch check, which also covers AVX-512 machines)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _build_name_and_dir() -> tuple[str, str]:
    """A module name and folder unique to the source, flags and torch version (no clash between versions)."""
    # the flags and the interpreter's ABI (two venvs of different Pythons may share the cache)
    sha = hashlib.sha256(" ".join(CFLAGS + LDFLAGS + (sys.implementation.cache_tag,)).encode())
    for path in SOURCES + HEADERS:
        with open(path, "rb") as f:
            sha.update(f.read())
    digest = sha.hexdigest()[:12]
    tag = torch.__version__.replace("+", "_").replace(".", "_")
    return f"bitllava_ternary_cpu_{digest}", os.path.join(cache_root(), f"ternary_cpu-{digest}-torch{tag}")


def _ninja_on_path() -> None:
    """A venv's `ninja` (a dependency of deepspeed) is found even when the venv is not activated."""
    venv_bin = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and os.path.isfile(os.path.join(venv_bin, "ninja")):
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")


@lru_cache(maxsize=1)
def load_cpu_kernels() -> ModuleType | None:
    """The compiled extension module, or None (with the reason in `cpu_kernel_failure()`)."""
    global _failure
    if os.environ.get("BITLLAVA_DISABLE_CPU_KERNEL") == "1":
        _failure = "disabled by BITLLAVA_DISABLE_CPU_KERNEL=1"
        return None
    if not cpu_supports_avx2():
        _failure = f"CPU {platform.machine()} without AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})"
        log.warning("packed ternary CPU kernel unavailable: %s; using the PyTorch reference path", _failure)
        return None
    try:
        module = _built_module()
    except Exception as err:  # a missing compiler, ninja or headers: fall back, never crash
        _failure = f"build failed: {type(err).__name__}: {str(err).strip()[-2000:]}"
        log.warning("packed ternary CPU kernel unavailable (%s); using the PyTorch reference path", _failure)
        return None
    _apply_gemm_choice(module)
    return module


def _built_module() -> ModuleType:
    """Import the cached library, building it first (one process at a time) when it is missing or incomplete."""
    name, build_dir = _build_name_and_dir()
    library = os.path.join(build_dir, f"{name}.so")
    done = library + ".done"  # the library's size, written once it built and imported: a cut-short link has none
    with build_lock(build_dir):
        if os.path.isfile(library) and _read(done) == str(os.path.getsize(library)):
            try:
                return _import_library(name, library)
            except ImportError as err:  # built against another libtorch or Python: build it again, once
                log.warning("cached CPU kernel %s does not import (%s); rebuilding", library, err)
                os.remove(done)
        if os.path.exists(library):  # never dlopen a possibly truncated library (it crashes the process)
            log.warning("cached CPU kernel %s is incomplete (a build cut short); rebuilding", library)
            os.remove(library)
        from torch.utils.cpp_extension import load

        _ninja_on_path()
        log.info("building the packed ternary CPU kernel in %s (about a minute, once)", build_dir)
        # lists of their own: torch appends to the flag lists it is given
        module = load(name=name, sources=SOURCES, build_directory=build_dir, extra_cflags=list(CFLAGS),
                      extra_ldflags=list(LDFLAGS), verbose=False)
        with open(done + ".tmp", "w") as f:
            f.write(str(os.path.getsize(library)))
        os.replace(done + ".tmp", done)  # whole or absent
        return module


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _import_library(name: str, library: str) -> ModuleType:
    """The extension module from its .so, as torch's `load` imports it, without its build check."""
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _apply_gemm_choice(module: ModuleType) -> None:
    """$BITLLAVA_CPU_GEMM: "auto" (the widest path the CPU has), a path name, or "rows" (no GEMM path)."""
    choice = os.environ.get(GEMM_ENV, "auto").strip().lower() or "auto"
    if choice == "auto":
        return
    if choice == "rows":
        module.set_gemm_min_rows(2**62)
        return
    if choice not in module.gemm_paths():
        raise ValueError(f"{GEMM_ENV}={choice!r}: this CPU can run {module.gemm_paths()} (or 'rows', 'auto')")
    module.set_gemm_path(choice)


def kernel_info() -> dict:
    """What the CPU kernel runs here: the GEMM path for M >= gemm_min_rows, the paths the CPU has."""
    module = load_cpu_kernels()
    if module is None:
        return {"cpu_kernel": None, "reason": cpu_kernel_failure()}
    return {"cpu_kernel": "avx2", "gemm_path": module.gemm_path(), "gemm_paths": list(module.gemm_paths()),
            "gemm_min_rows": int(module.gemm_min_rows())}


def cpu_kernel_failure() -> str | None:
    """Why `load_cpu_kernels()` returned None (None when it loaded or was never tried)."""
    return _failure
