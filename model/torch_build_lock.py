"""Torch's JIT-build lock file (`lock` in an extension's build folder) outlives a process killed while
holding it, and from then on every `torch.utils.cpp_extension.load` of that extension waits forever
(`FileBaton.wait` has no timeout); a Serve replica or Train worker stopped during its start-up leaves
one. So this project's builds and loads run under an OS file lock (`flock`, released by the kernel when
its holder dies), and under it a `lock` file can only be a dead process's: it is removed first."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from typing import Iterator

log = logging.getLogger(__name__)
BATON = "lock"  # torch.utils.cpp_extension's FileBaton file name


def clear_dead_baton(build_dir: str) -> None:
    """Remove `build_dir/lock` (call it holding `build_lock`)."""
    path = os.path.join(build_dir, BATON)
    try:
        os.remove(path)
    except FileNotFoundError:
        return
    log.warning("removed %s, the build lock of a process that died while building (torch would wait forever)", path)


@contextlib.contextmanager
def build_lock(build_dir: str) -> Iterator[None]:
    """One process of this host at a time in `build_dir`, a dead one's torch lock cleared."""
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(build_dir, "build.flock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the OS if this process dies
        clear_dead_baton(build_dir)
        yield


def load_deepspeed_shm_op() -> None:
    """Build (once, about 40 s on 2 cores) or load DeepSpeed's CPU shared-memory all-reduce op under
    `build_lock`, before `deepspeed.init_distributed` loads it again (then a no-op check): the ranks of a
    host take turns, and a rank killed in the build cannot leave a lock the next run waits on forever."""
    from deepspeed.comm.torch import build_shm_op
    from torch.utils.cpp_extension import _get_build_directory

    with build_lock(_get_build_directory("deepspeed_shm_comm", verbose=False)):
        build_shm_op()
