"""Torch's JIT-build lock file (`lock` in an extension's build folder) outlives a process killed while
holding it, and from then on every `torch.utils.cpp_extension.load` of that extension waits forever
(`FileBaton.wait` has no timeout). A Serve replica or Train worker stopped during its start-up leaves
one. These helpers clear such a file before a load: at once where the caller knows no one else can be
building, else after waiting longer than any build takes."""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)
BATON = "lock"  # torch.utils.cpp_extension's FileBaton file name


def clear_dead_baton(build_dir: str, wait_s: float = 0.0, poll_s: float = 0.5) -> bool:
    """Remove `build_dir/lock` if it is still there after `wait_s` seconds; True if one was removed."""
    path = os.path.join(build_dir, BATON)
    deadline = time.time() + wait_s
    while os.path.exists(path) and time.time() < deadline:
        time.sleep(poll_s)
    try:
        os.remove(path)
    except FileNotFoundError:
        return False
    log.warning("removed %s, the build lock of a process that died while building (torch would wait forever)", path)
    return True


def clear_dead_deepspeed_baton(op_name: str = "deepspeed_shm_comm", wait_s: float = 300.0) -> bool:
    """The same for a DeepSpeed JIT op (CPU training builds `deepspeed_shm_comm` on first use), waiting up to
    `wait_s` for a live build in another process (about 40 s on 2 cores) before treating its lock as dead."""
    from torch.utils.cpp_extension import _get_build_directory

    return clear_dead_baton(_get_build_directory(op_name, verbose=False), wait_s=wait_s)
