"""The CPU kernel's cache survives what killed processes leave in it: torch's `lock` file of a process
killed inside `load()` (which makes torch wait forever) and a library cut short by a kill mid-link.

Each case copies the suite's built cache into a temporary one and loads the kernel in a fresh process."""

import os
import shutil
import subprocess
import sys

import pytest

from model.packed.kernels import cpu as cpu_kernels

LOAD = ("import json; from model.packed.kernels.cpu import kernel_info, cpu_kernel_failure; "
        "info = kernel_info(); print(json.dumps(info)); assert info['cpu_kernel'], cpu_kernel_failure()")


@pytest.fixture
def cache_copy(tmp_path):
    module = cpu_kernels.load_cpu_kernels()
    assert module is not None, cpu_kernels.cpu_kernel_failure()
    build_dir, name = os.path.dirname(module.__file__), module.__name__  # wherever this process built it
    copy = tmp_path / "cache"
    shutil.copytree(build_dir, copy / os.path.basename(build_dir))
    return copy, copy / os.path.basename(build_dir), name


def load_in_fresh_process(cache) -> subprocess.CompletedProcess:
    env = {**os.environ, "BITLLAVA_KERNEL_CACHE": str(cache)}
    env.pop(cpu_kernels.GEMM_ENV, None)
    return subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=240)


def test_a_dead_builders_lock_file_does_not_block_the_next_build(cache_copy):
    cache, build_dir, name = cache_copy
    (build_dir / f"{name}.so").unlink()  # so the next process must build (relink) ...
    (build_dir / "lock").write_text("")  # ... where torch alone would wait for this file forever
    out = load_in_fresh_process(cache)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (build_dir / f"{name}.so").is_file() and not (build_dir / "lock").exists()


def test_a_cached_library_loads_despite_a_lock_file(cache_copy):
    cache, build_dir, _ = cache_copy
    (build_dir / "lock").write_text("")
    out = load_in_fresh_process(cache)
    assert out.returncode == 0, out.stderr[-3000:]


def test_a_truncated_library_is_rebuilt(cache_copy):
    cache, build_dir, name = cache_copy
    library = build_dir / f"{name}.so"
    library.write_bytes(library.read_bytes()[:4096])
    out = load_in_fresh_process(cache)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "incomplete" in out.stderr and "rebuilding" in out.stderr
    assert library.stat().st_size > 4096


def test_deepspeeds_shm_op_loads_past_a_dead_builders_lock(monkeypatch):
    """What every CPU Train worker runs before deepspeed.init_distributed (a build of about 40 s the first time)."""
    from torch.utils.cpp_extension import _get_build_directory

    from model.torch_build_lock import load_deepspeed_shm_op

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    build_dir = _get_build_directory("deepspeed_shm_comm", verbose=False)
    os.makedirs(build_dir, exist_ok=True)
    lock = os.path.join(build_dir, "lock")
    open(lock, "w").close()  # a rank killed inside torch's load: torch alone would wait here forever
    load_deepspeed_shm_op()
    assert not os.path.exists(lock) and any(f.endswith(".so") for f in os.listdir(build_dir))
