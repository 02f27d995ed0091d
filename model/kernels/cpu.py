"""The AVX2 CPU kernels (`ternary_cpu.cpp`), compiled on first use and cached.

Built with `torch.utils.cpp_extension.load` (ninja, the system C++ compiler, OpenMP through
PyTorch's runtime), as DeepSpeed builds its ops: the first call compiles for about a
minute, later processes load the cached library. The cache lives in `$BITLLAVA_KERNEL_CACHE`,
else `$XDG_CACHE_HOME/bitllava/kernels`, else `~/.cache/bitllava/kernels`, in a folder named after
the source's hash and the torch version, so editing the source or upgrading torch rebuilds.

When the CPU lacks AVX2 or the build fails, `load_cpu_kernels()` logs why once and returns None;
callers then use the plain PyTorch reference (`model.kernels.reference`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
from functools import lru_cache
from types import ModuleType

import torch

log = logging.getLogger(__name__)
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ternary_cpu.cpp")
_failure: str | None = None


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
    """A module name and folder unique to the source and torch version (no clash between versions)."""
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
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
        from torch.utils.cpp_extension import load

        _ninja_on_path()
        name, build_dir = _build_name_and_dir()
        os.makedirs(build_dir, exist_ok=True)
        return load(
            name=name,
            sources=[SOURCE],
            build_directory=build_dir,
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # a missing compiler, ninja or headers: fall back, never crash
        _failure = f"build failed: {type(err).__name__}: {str(err).strip()[-2000:]}"
        log.warning("packed ternary CPU kernel unavailable (%s); using the PyTorch reference path", _failure)
        return None


def cpu_kernel_failure() -> str | None:
    """Why `load_cpu_kernels()` returned None (None when it loaded or was never tried)."""
    return _failure
