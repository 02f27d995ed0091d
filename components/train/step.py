"""One optimizer step on a DeepSpeed engine, and what happens when it is not finite.

    for batch in the step's grad_accum micro-batches:
        loss = engine(**batch).loss;  engine.backward(loss);  engine.step()   # the last step() updates

With `z_loss_coef` c > 0 (Chameleon's stability term; PaLM's 1e-4), the loss backpropagated is the
cross-entropy plus c * z_loss, where z_loss is the mean over label tokens of logsumexp(logits)^2 at
the positions that predict them: it keeps the softmax normaliser near 1 (log Z near 0).

A step whose loss (any micro-batch, any rank) or global gradient norm is not finite is skipped: no
parameter, optimizer-state or learning-rate-schedule update. DeepSpeed's ZeRO optimizers already work
this way for a non-finite gradient norm (deepspeed 0.19, `runtime/zero/stage_1_and_2.py` and
`stage3.py`, `step()`: an invalid norm sets `overflow`, the gradients are dropped and `step()` returns
before the update; `engine._take_model_step` then leaves the LR scheduler alone and counts
`engine.skipped_steps`). The norm is all-reduced over the ranks before that test, so every rank takes
the same decision and later collectives stay in step. In fp32 the test is always on; in bf16 it is
DeepSpeed's `bf16.check_grad_overflow`, on by default. A non-finite loss is backpropagated multiplied by
NaN, so that its gradients are sure to be non-finite and it takes the same path.

The ranks' views are then all-reduced once more (`reduce_sum`): the step's outcome must be the same on
every rank, and a non-finite loss must never have led to an applied update; either is an invariant
violation, not a data problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over the ranks (float64)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def z_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over label tokens of logsumexp(logits)^2, with the causal shift of the cross-entropy (the
    logits at position t predict labels[t + 1]; -100 labels are ignored). 0 where there are no labels."""
    mask = labels[..., 1:] != -100
    log_z = torch.logsumexp(logits[..., :-1, :][mask].float(), dim=-1)
    return (log_z ** 2).sum() / mask.sum().clamp(min=1)


@dataclass
class StepResult:
    losses: list[float]  # this rank's micro-batch losses (the cross-entropy), in order
    finite_losses: list[bool]  # per micro-batch on this rank
    grad_norm: float | None  # global gradient norm (inf on a skipped step; None if DeepSpeed computes none)
    skipped: bool  # no update was applied: the same on every rank
    ranks_nonfinite_loss: int  # ranks where some micro-batch loss was not finite
    z_losses: list[float] | None = None  # this rank's micro-batch z-losses (unscaled), when z_loss_coef > 0


def train_step(engine, micro_batches: Iterable[dict], world: int,
               reduce_sum: Callable[[list[float]], list[float]] = all_reduce_sum,
               z_loss_coef: float = 0.0) -> StepResult:
    """Forward, backward and DeepSpeed step over one optimizer step's micro-batches (collective: every rank
    calls it with its own micro-batches, as many as the engine's gradient_accumulation_steps)."""
    losses, finite, z_losses = [], [], []
    for batch in micro_batches:
        assert len(losses) < engine.gradient_accumulation_steps(), "more micro-batches than one optimizer step"
        out = engine(**batch)
        loss = total = out.loss
        if z_loss_coef:
            z = z_loss(out.logits, batch["labels"])
            total = loss + z_loss_coef * z
            z_losses.append(z.item())
        ok = bool(torch.isfinite(total))
        engine.backward(total if ok else total * float("nan"))
        engine.step()
        losses.append(loss.item())
        finite.append(ok)
    assert len(losses) == engine.gradient_accumulation_steps(), "fewer micro-batches than one optimizer step"
    applied = engine.was_step_applied()
    not_applied, bad_loss = reduce_sum([0.0 if applied else 1.0, 0.0 if all(finite) else 1.0])
    if not_applied not in (0, world):
        raise RuntimeError(f"DeepSpeed applied the step on {world - int(not_applied)} of {world} ranks")
    if bad_loss and not not_applied:
        raise RuntimeError("DeepSpeed applied a step whose loss was not finite (is its overflow check off?)")
    norm = engine.get_global_grad_norm()
    return StepResult(losses=losses, finite_losses=finite, grad_norm=None if norm is None else float(norm),
                      skipped=bool(not_applied), ranks_nonfinite_loss=int(bad_loss),
                      z_losses=z_losses if z_loss_coef else None)


class NonFiniteStepsError(ValueError):
    """More consecutive optimizer steps were skipped for non-finite values than the config allows.

    The workers do not raise it (Ray Train would restart them, and no restart gets past the same steps):
    rank 0 writes its message to the run's stop file (`stop_file`) and every rank returns; the driver raises
    it from there. A ValueError: the CLI prints it as one line, as every error that no restart can fix."""


def stop_file(out: str, run_id: str) -> str:
    """Where a run stopped by NonFiniteStepsError leaves its message (one per MLflow run: never stale)."""
    from components import storage

    return storage.join(out, f"stopped-{run_id}.json")


@dataclass
class SkipCounter:
    """Skipped optimizer steps, in all and in the current run of them; part of the trainer state."""

    total: int = 0
    consecutive: int = 0
    first_of_streak: int | None = None  # optimizer step that began the current run of skips

    def record(self, step: int, skipped: bool) -> None:
        if not skipped:
            self.consecutive, self.first_of_streak = 0, None
            return
        self.total += 1
        self.consecutive += 1
        if self.first_of_streak is None:
            self.first_of_streak = step

    def exceeded(self, limit: int) -> bool:
        """More than `limit` (TrainConfig.max_consecutive_skips) steps in a row were skipped: stop the run."""
        return self.consecutive > limit

    def error(self, limit: int, step: int, sample_ids: list[str], checkpoint_step: int | None) -> NonFiniteStepsError:
        kept = (f"the last checkpoint (step {checkpoint_step}) is intact" if checkpoint_step is not None
                else "no checkpoint was written before them")
        shown = ", ".join(sample_ids[:16]) + (f" and {len(sample_ids) - 16} more" if len(sample_ids) > 16 else "")
        return NonFiniteStepsError(
            f"training stopped at optimizer step {step}: {self.consecutive} steps in a row (since step "
            f"{self.first_of_streak}) had a non-finite loss or gradient norm and were skipped, more than "
            f"max_consecutive_skips={limit}; {kept}. Samples of the last skipped step: {shown}. Check those "
            f"samples in the store (inf/NaN image features or pixels) or lower lr; the same command with the "
            f"same out resumes from the last checkpoint (with a larger max_consecutive_skips, past those steps).")
