"""Checkpoints of a training phase through Ray Train: every rank's DeepSpeed shard plus the trainer state.

A checkpoint folder holds `deepspeed/` (each rank writes its ZeRO shard; rank 0 the module states too)
and `trainer_state.json` (rank 0): where in the data the run is and its skip counts. Saving writes into
a fresh temporary folder on every rank, then a barrier, then `ray.train.report` (collective), which copies
it to storage as a new `checkpoint_*` folder: a checkpoint already on storage is never written again, so
the last one stays intact whatever happens afterwards. `restore` loads one back into the engine, so a
restarted run continues at the same optimizer step on the same data.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

from components.train.step import SkipCounter

TRAINER_STATE = "trainer_state.json"
DS_TAG = "deepspeed"


@dataclass
class TrainerState:
    global_step: int = 0  # optimizer steps done, skipped ones included (they consumed their data)
    epoch: int = 0
    epoch_micro: int = 0  # micro-batches of `epoch` done
    skips: SkipCounter = field(default_factory=SkipCounter)  # steps skipped for non-finite values

    @classmethod
    def from_dict(cls, d: dict) -> "TrainerState":
        """Missing keys (checkpoints written before skip counting) take their defaults."""
        values = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        values["skips"] = SkipCounter(**values.get("skips", {}))
        return cls(**values)


def _ray_report(metrics: dict, directory: str) -> None:
    import ray.train

    from components.train.checkpoint_upload import upload_checkpoint  # retries through object-store outages

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                     checkpoint_upload_fn=upload_checkpoint)


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


class CheckpointManager:
    """`due` says when to save, `save` writes and reports one (collective), `restore` reads one back."""

    def __init__(self, engine, rank: int, every: int, report: Callable[[dict, str], None] = _ray_report,
                 barrier: Callable[[], None] = _barrier):
        self.engine, self.rank, self.every = engine, rank, every
        self.report, self.barrier = report, barrier
        self.last_step: int | None = None  # optimizer step of the last checkpoint saved or restored

    def due(self, step: int, done: bool) -> bool:
        return step % self.every == 0 or done

    def save(self, state: TrainerState, metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as d:
            self.engine.save_checkpoint(d, tag=DS_TAG)
            if self.rank == 0:
                with open(os.path.join(d, TRAINER_STATE), "w") as f:
                    json.dump(asdict(state), f)
            self.barrier()
            self.report(metrics, d)
        self.last_step = state.global_step

    def restore(self, checkpoint) -> TrainerState:
        """The state saved with `checkpoint` (a ray.train.Checkpoint, or None: a fresh state), engine loaded."""
        if checkpoint is None:
            return TrainerState()
        with checkpoint.as_directory() as d:
            self.engine.load_checkpoint(d, tag=DS_TAG)
            with open(os.path.join(d, TRAINER_STATE)) as f:
                state = TrainerState.from_dict(json.load(f))
        self.last_step = state.global_step
        return state
