"""What a command shows on the console: its steps, their progress and the result, not pages of the
libraries' INFO lines. `--verbose` brings those back.

`quiet_console(verbose)` runs in the driver before Ray starts. Ray's and Ray Data's own environment
variables carry the levels to every Ray process this driver starts; BITLLAVA_VERBOSE carries the
choice to code of ours that runs inside Ray workers (`quiet_worker_logs`, e.g. for DeepSpeed).
Ray Data's progress bars stay where stderr is a terminal.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "BITLLAVA_VERBOSE"
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.serve", "ray.tune", "DeepSpeed", "mlflow", "alembic",
                   "torch.distributed", "transformers")
QUIET_ENV = {
    "RAY_LOGGER_LEVEL": "warning",  # the "ray" logger of every Ray process
    "RAY_DATA_LOG_LEVEL": "WARNING",
    "RAY_DEDUP_LOGS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
}


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "1") != "0"


def quiet_console(verbose: bool) -> None:
    """Set the console's verbosity for this process and the Ray processes it starts."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if verbose:
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if not sys.stderr.isatty():  # progress bars redrawn into a log file are pages of lines
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # read when Ray Data's context is made
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    quiet_worker_logs()


def quiet_worker_logs() -> None:
    """Inside a process (driver or Ray worker): library loggers at WARNING unless verbose."""
    if is_verbose():
        return
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
