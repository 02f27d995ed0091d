"""Per-optimizer-step training metrics: accumulated over a step's micro-batches, reduced over ranks.

    loss           mean over ranks of each rank's mean micro-batch loss
    lr             the scheduler's learning rate after the step
    grad_norm      DeepSpeed's global gradient norm (before clipping)
    tokens_per_s   non-pad tokens of all ranks / seconds since the previous step ended
    samples_per_s  samples of all ranks / the same seconds
    mfu            tokens_per_s x training FLOPs per token / (peak FLOP/s x ranks), where the peak is known
    skipped_steps  optimizer steps skipped so far for a non-finite loss or gradient norm (components.train.step)
    z_loss         with z_loss_coef > 0: mean over ranks of each rank's mean micro-batch z-loss (unscaled)
"""

from __future__ import annotations

import time
from typing import Callable


class StepMetrics:
    """Accumulate a step's micro-batches with `add`; `reduce` (collective: every rank calls it) gives the step's
    metrics; `reset` starts the next window (its clock too: call it after logging, so that the time spent
    logging is not charged to the next step). A skipped step is reduced like any other: its loss and grad_norm
    come out as they were (NaN / inf)."""

    def __init__(self, world: int, reduce_sum: Callable[[list[float]], list[float]],
                 flops_per_token: float | None = None, peak_tflops: float | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.world, self.reduce_sum, self.clock = world, reduce_sum, clock
        self.flops_per_token, self.peak_tflops = flops_per_token, peak_tflops
        self.reset()

    def reset(self) -> None:
        self.loss, self.tokens, self.samples, self.micro = 0.0, 0, 0, 0
        self.z = None
        self.start = self.clock()

    def add(self, loss: float, tokens: int, samples: int, z_loss: float | None = None) -> None:
        self.loss += loss
        if z_loss is not None:
            self.z = (self.z or 0.0) + z_loss
        self.tokens += tokens
        self.samples += samples
        self.micro += 1

    def reduce(self, step: int, lr: float, grad_norm: float | None, skipped_steps: int) -> dict:
        assert self.micro, "no micro-batch was added since the last reset"
        elapsed = self.clock() - self.start
        values = [self.loss / self.micro, self.tokens, self.samples]
        if self.z is not None:  # every rank adds z (z_loss > 0) or none does: the reduced lists match
            values.append(self.z / self.micro)
        loss_sum, tokens, samples, *z_sum = self.reduce_sum(values)
        metrics = {
            "loss": loss_sum / self.world,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": tokens / elapsed,
            "samples_per_s": samples / elapsed,
            "skipped_steps": skipped_steps,
            "step": step,
        }
        if z_sum:
            metrics["z_loss"] = z_sum[0] / self.world
        if self.peak_tflops and self.flops_per_token:
            metrics["mfu"] = metrics["tokens_per_s"] * self.flops_per_token / (self.peak_tflops * 1e12 * self.world)
        return metrics
