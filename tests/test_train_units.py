"""The training loop's parts alone: `train_step` on a real single-rank DeepSpeed engine (ZeRO-2 and ZeRO-3,
the project's DeepSpeed config), the step metrics accumulator, the skip counter and the checkpoint manager."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from components.train.checkpointing import DS_TAG, TRAINER_STATE, CheckpointManager, TrainerState
from components.train.config import TrainConfig
from components.train.metrics import StepMetrics
from components.train.step import NonFiniteStepsError, SkipCounter, train_step, z_loss
from tests.backbone_folders import FAMILIES, write_llm_folder

GRAD_ACCUM = 2


# --- train_step on a real DeepSpeed engine --------------------------------------------------------------------

class Toy(torch.nn.Module):
    """A two-layer regressor whose forward returns `.loss`, as the multimodal model does; `inf_grad` makes the
    loss finite but its gradients infinite (a non-finite gradient norm with a finite loss)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 1)

    def forward(self, x, y, inf_grad=False):
        out = self.b(torch.relu(self.a(x)))
        if inf_grad:
            out.register_hook(lambda g: g * float("inf"))
        return SimpleNamespace(loss=torch.nn.functional.mse_loss(out.squeeze(-1), y))


@pytest.fixture(scope="module")
def deepspeed_single_rank():
    """torch.distributed with one gloo rank in this process, as DeepSpeed sets it up on a CPU worker."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    yield deepspeed
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def make_engine(deepspeed, zero_stage: int, model: torch.nn.Module):
    from transformers import get_cosine_schedule_with_warmup

    from components.train.deepspeed_config import deepspeed_config

    cfg = TrainConfig(phase="instruct", data="-", out="-", init="-", workers=1, zero_stage=zero_stage,
                      per_device_batch=4, grad_accum=GRAD_ACCUM, lr=1e-2, max_grad_norm=1.0)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 1, 10)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=deepspeed_config(cfg, bf16=False), model_parameters=params)
    return engine, scheduler


def weights(deepspeed, engine) -> dict:
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params) if hasattr(params[0], "ds_id") else contextlib.nullcontext():
        return {k: v.detach().clone() for k, v in engine.module.named_parameters()}


def batches(seed: int, poison: str | None = None) -> list[dict]:
    """One optimizer step's micro-batches; `poison` makes the second one carry inf inputs or inf gradients."""
    g = torch.Generator().manual_seed(seed)
    out = [{"x": torch.randn(4, 8, generator=g), "y": torch.randn(4, generator=g)} for _ in range(GRAD_ACCUM)]
    if poison == "inputs":
        out[1]["x"][2, 3] = float("inf")  # one value of one sample, as a poisoned image feature
    elif poison == "gradients":
        out[1]["inf_grad"] = True
    return out


def plain_step(engine, micro_batches):
    """The loop before skipping existed: forward, backward, step for each micro-batch."""
    for batch in micro_batches:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()


@pytest.fixture(scope="module")
def toy_init():
    torch.manual_seed(0)
    return Toy()


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_clean_steps_update_exactly_as_plain_engine_calls(deepspeed_single_rank, toy_init, zero_stage):
    ds = deepspeed_single_rank
    plain, _ = make_engine(ds, zero_stage, copy.deepcopy(toy_init))
    stepped, _ = make_engine(ds, zero_stage, copy.deepcopy(toy_init))
    for seed in range(3):
        plain_step(plain, batches(seed))
        result = train_step(stepped, batches(seed), world=1)
        assert not result.skipped and all(result.finite_losses) and result.grad_norm > 0
    a, b = weights(ds, plain), weights(ds, stepped)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["a.weight"], toy_init.a.weight)


class ToyLM(torch.nn.Module):
    """Next-token logits over 5 tokens with the multimodal model's `.loss` (shifted, -100 ignored) and `.logits`."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 8)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, input_ids, labels):
        logits = self.head(torch.tanh(self.embed(input_ids)))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 5), labels[:, 1:].reshape(-1))
        return SimpleNamespace(loss=loss, logits=logits)


def lm_batches(seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(GRAD_ACCUM):
        ids = torch.randint(0, 5, (4, 6), generator=g)
        labels = ids.clone()
        labels[:, :2] = -100  # a prompt
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_z_loss_equals_a_hand_computation():
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0], [9.0, 0.0, 0.0]]])
    labels = torch.tensor([[-100, 2, -100, 1]])  # predicted from positions 0 and 2 (position 3 predicts nothing)
    log_z = [math.log(math.exp(1.0) + math.exp(2.0) + math.exp(0.5)), math.log(3 * math.exp(2.0))]
    assert z_loss(logits, labels).item() == pytest.approx((log_z[0] ** 2 + log_z[1] ** 2) / 2, rel=1e-6)
    assert z_loss(logits, torch.full((1, 4), -100)).item() == 0.0  # no label: nothing to average


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_z_loss_is_added_to_the_loss_that_trains(deepspeed_single_rank, zero_stage):
    ds, coef = deepspeed_single_rank, 0.05
    torch.manual_seed(0)
    init = ToyLM()
    by_hand, _ = make_engine(ds, zero_stage, copy.deepcopy(init))
    stepped, _ = make_engine(ds, zero_stage, copy.deepcopy(init))
    for seed in range(3):
        expected_z = []
        for batch in lm_batches(seed):  # the loss plus c * z, backpropagated through plain engine calls
            out = by_hand(**batch)
            expected_z.append(z_loss(out.logits, batch["labels"]).item())
            by_hand.backward(out.loss + coef * z_loss(out.logits, batch["labels"]))
            by_hand.step()
        result = train_step(stepped, lm_batches(seed), world=1, z_loss_coef=coef)
        assert not result.skipped and result.z_losses == pytest.approx(expected_z, rel=1e-6)
    a, b = weights(ds, by_hand), weights(ds, stepped)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-7) for k in a)
    plain, _ = make_engine(ds, zero_stage, copy.deepcopy(init))
    for seed in range(3):
        assert train_step(plain, lm_batches(seed), world=1).z_losses is None  # off by default
    assert not torch.equal(weights(ds, plain)["head.weight"], b["head.weight"])  # the term changes the update


@pytest.mark.parametrize("zero_stage", [2, 3])
@pytest.mark.parametrize("poison", ["inputs", "gradients"])
def test_a_non_finite_step_updates_nothing(deepspeed_single_rank, toy_init, zero_stage, poison):
    """Clean, poisoned, clean ends bit-identical to clean, clean: the skipped step left weights, optimizer
    state and learning-rate schedule as they were, and no gradient leaked into the next step."""
    ds = deepspeed_single_rank
    engine, scheduler = make_engine(ds, zero_stage, copy.deepcopy(toy_init))
    reference, _ = make_engine(ds, zero_stage, copy.deepcopy(toy_init))
    train_step(engine, batches(0), world=1)
    before, lr_before = weights(ds, engine), scheduler.get_last_lr()
    result = train_step(engine, batches(1, poison), world=1)
    assert result.skipped and result.grad_norm == float("inf")
    assert result.finite_losses == [True, poison == "gradients"]
    assert result.ranks_nonfinite_loss == (1 if poison == "inputs" else 0)
    after = weights(ds, engine)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert scheduler.get_last_lr() == lr_before and engine.skipped_steps == 1
    assert not train_step(engine, batches(2), world=1).skipped

    train_step(reference, batches(0), world=1)
    train_step(reference, batches(2), world=1)
    a, b = weights(ds, engine), weights(ds, reference)
    assert all(torch.equal(a[k], b[k]) for k in a)


class FakeEngine:
    """Just what train_step calls; `applied` is what DeepSpeed's overflow check would have decided."""

    def __init__(self, losses, applied):
        self.losses, self.applied = iter(losses), applied

    def gradient_accumulation_steps(self):
        return 1

    def __call__(self, **batch):
        return SimpleNamespace(loss=torch.tensor(next(self.losses)))

    def backward(self, loss):
        pass

    def step(self):
        pass

    def was_step_applied(self):
        return self.applied

    def get_global_grad_norm(self):
        return 1.0


def test_train_step_refuses_what_would_desynchronise_or_corrupt():
    with pytest.raises(RuntimeError, match="loss was not finite"):  # DeepSpeed's overflow check was off
        train_step(FakeEngine([float("nan")], applied=True), [{}], world=1, reduce_sum=lambda v: v)
    with pytest.raises(RuntimeError, match="on 1 of 2 ranks"):  # the ranks took different decisions
        train_step(FakeEngine([1.0], applied=True), [{}], world=2, reduce_sum=lambda v: [v[0] + 1, v[1]])
    with pytest.raises(AssertionError, match="fewer micro-batches"):
        train_step(FakeEngine([], applied=True), [], world=1, reduce_sum=lambda v: v)


# --- the skip counter ------------------------------------------------------------------------------------------

def test_skip_counter_counts_runs_and_stops_past_the_limit():
    skips = SkipCounter()
    for step, skipped in enumerate([False, True, True, False, True], start=1):
        skips.record(step, skipped)
    assert (skips.total, skips.consecutive, skips.first_of_streak) == (3, 1, 5)
    assert not skips.exceeded(1) and skips.exceeded(0)  # 0: the first skipped step stops the run
    skips.record(6, True)
    assert skips.exceeded(1) and not skips.exceeded(2)
    error = skips.error(1, 6, [f"id{i} (#{i})" for i in range(20)], checkpoint_step=4)
    assert isinstance(error, NonFiniteStepsError)
    message = str(error)
    assert "2 steps in a row (since step 5)" in message and "max_consecutive_skips=1" in message
    assert "last checkpoint (step 4) is intact" in message and "id0 (#0)" in message and "4 more" in message
    assert "no checkpoint" in str(SkipCounter(1, 1, 5).error(0, 5, ["a"], checkpoint_step=None))


def test_max_consecutive_skips_is_validated():
    assert TrainConfig(phase="align", data="-", out="-", init="-").max_consecutive_skips == 10
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        TrainConfig(phase="align", data="-", out="-", init="-", max_consecutive_skips=-1)
    assert TrainConfig(phase="align", data="-", out="-", init="-").z_loss == 0.0
    for bad in (-1e-4, 1.0):
        with pytest.raises(ValueError, match="z_loss"):
            TrainConfig(phase="align", data="-", out="-", init="-", z_loss=bad)


# --- the metrics accumulator -----------------------------------------------------------------------------------

def test_step_metrics_accumulate_reduce_and_reset():
    clock = iter([0.0, 2.0, 10.0, 10.5]).__next__

    def two_equal_ranks(values):  # a sum over 2 ranks that added the same
        return [2 * v for v in values]

    metrics = StepMetrics(2, two_equal_ranks, flops_per_token=100.0, peak_tflops=1e-9, clock=clock)
    metrics.add(1.0, tokens=30, samples=4)
    metrics.add(3.0, tokens=10, samples=4)
    m = metrics.reduce(step=7, lr=0.5, grad_norm=0.25, skipped_steps=1)  # 2 s since the window began
    assert m == {"loss": 2.0, "lr": 0.5, "grad_norm": 0.25, "tokens_per_s": 40.0, "samples_per_s": 8.0,
                 "skipped_steps": 1, "step": 7, "mfu": pytest.approx(40.0 * 100 / (1e3 * 2))}
    metrics.reset()  # after logging, at 10 s: the next step's window starts here
    with pytest.raises(AssertionError):
        metrics.reduce(step=8, lr=0.5, grad_norm=None, skipped_steps=1)
    metrics.add(4.0, tokens=5, samples=2)
    metrics.add(float("nan"), tokens=5, samples=2)  # a step about to be skipped reduces as it was
    m = metrics.reduce(step=8, lr=0.5, grad_norm=float("inf"), skipped_steps=2)
    assert m["tokens_per_s"] == 2 * 10 / 0.5 and m["loss"] != m["loss"] and m["grad_norm"] == float("inf")

    with_z = StepMetrics(2, two_equal_ranks, clock=iter([0.0, 1.0]).__next__)
    with_z.add(1.0, tokens=1, samples=1, z_loss=4.0)
    with_z.add(1.0, tokens=1, samples=1, z_loss=2.0)
    assert with_z.reduce(step=1, lr=0.1, grad_norm=1.0, skipped_steps=0)["z_loss"] == 3.0  # mean over both

    no_peak = StepMetrics(1, lambda values: values, clock=iter([0.0, 1.0]).__next__)
    no_peak.add(1.0, tokens=1, samples=1)
    m = no_peak.reduce(step=1, lr=0.1, grad_norm=None, skipped_steps=0)
    assert "mfu" not in m and m["grad_norm"] != m["grad_norm"]  # no known peak: no MFU; no norm: NaN
    assert "z_loss" not in m  # z-loss off: no metric


# --- the checkpoint manager ------------------------------------------------------------------------------------

class FolderEngine:
    """save_checkpoint / load_checkpoint of a DeepSpeed engine, as one JSON file of its 'weights'."""

    def __init__(self, weights):
        self.weights = weights

    def save_checkpoint(self, d, tag):
        os.makedirs(os.path.join(d, tag))
        with open(os.path.join(d, tag, "shard.json"), "w") as f:
            json.dump(self.weights, f)

    def load_checkpoint(self, d, tag):
        with open(os.path.join(d, tag, "shard.json")) as f:
            self.weights = json.load(f)


class FolderCheckpoint:
    def __init__(self, path):
        self.path = path

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


def test_checkpoint_manager_saves_reports_and_restores(tmp_path):
    storage, barriers = [], []

    def report(metrics, directory):  # what ray.train.report does with it: a new checkpoint folder on storage
        dest = tmp_path / f"checkpoint_{len(storage):06d}"
        shutil.copytree(directory, dest)
        storage.append((metrics, dest))

    engine = FolderEngine({"w": 1.0})
    manager = CheckpointManager(engine, rank=0, every=3, report=report, barrier=lambda: barriers.append(1))
    assert [s for s in range(1, 8) if manager.due(s, done=s == 7)] == [3, 6, 7]
    state = TrainerState(global_step=3, epoch=0, epoch_micro=6, skips=SkipCounter(2, 1, 3))
    manager.save(state, {"loss": 0.5, "step": 3})
    engine.weights = {"w": 2.0}
    manager.save(TrainerState(global_step=6, epoch=1, epoch_micro=2), {"loss": 0.4, "step": 6})
    assert len(barriers) == 2 and manager.last_step == 6
    (m0, first), (_, second) = storage
    assert m0 == {"loss": 0.5, "step": 3}
    assert json.loads((first / DS_TAG / "shard.json").read_text()) == {"w": 1.0}  # never written again
    assert json.loads((first / TRAINER_STATE).read_text())["skips"] == {"total": 2, "consecutive": 1,
                                                                        "first_of_streak": 3}

    restored_engine = FolderEngine(None)
    restorer = CheckpointManager(restored_engine, rank=0, every=3, report=report, barrier=lambda: None)
    assert restorer.restore(FolderCheckpoint(str(first))) == state and restored_engine.weights == {"w": 1.0}
    assert restorer.last_step == 3
    assert restorer.restore(None) == TrainerState()


def test_trainer_state_of_a_checkpoint_written_before_skip_counting():
    old = {"global_step": 5, "epoch": 1, "epoch_micro": 2}
    assert TrainerState.from_dict(old) == TrainerState(5, 1, 2, SkipCounter())


def test_only_rank_zero_writes_the_trainer_state(tmp_path):
    seen = []
    manager = CheckpointManager(FolderEngine({}), rank=1, every=1, barrier=lambda: None,
                                report=lambda metrics, d: seen.append(sorted(os.listdir(d))))
    manager.save(TrainerState(global_step=1), {"step": 1})
    assert seen == [[DS_TAG]]



def test_z_loss_from_yaml_is_a_number(tmp_path):
    from components.train.config import load_train_config

    path = tmp_path / "t.yaml"
    path.write_text("phase: align\nz_loss: 1e-5\n")  # YAML 1.1 reads this as a string
    assert load_train_config(str(path), data="d", out="o", init="i").z_loss == 1e-5


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_backbone_trains_under_zero3(deepspeed_single_rank, family, tmp_path):
    """The instruct recipe on each transformers backbone through DeepSpeed ZeRO-3 (partitioned parameters, tied
    or untied heads, the added `<image>` row): the loss falls and the gathered weights moved and stay finite."""
    from PIL import Image

    from components.train.deepspeed_config import deepspeed_config
    from components.train.loop import apply_recipe, parameter_groups
    from model.assemble import init_model
    from tests.few_steps import answer_sample

    ds = deepspeed_single_rank
    write_llm_folder(str(tmp_path / "llm"), family, seed=1)
    model, tokenizer, processor = init_model("tiny", llm=str(tmp_path / "llm"))
    cfg = TrainConfig(phase="instruct", data="-", out="-", init="-", workers=1, zero_stage=3, per_device_batch=1,
                      grad_accum=1, lr=3e-3)
    apply_recipe(model, cfg)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    groups = parameter_groups(model, cfg)
    engine, *_ = ds.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=cfg.lr),
                               config=deepspeed_config(cfg, bf16=False),
                               model_parameters=[p for g in groups for p in g["params"]])
    loaded = type("Loaded", (), {"model": model, "tokenizer": tokenizer, "image_processor": processor})
    ids, labels, pixels = answer_sample(loaded, Image.new("RGB", (64, 64), (200, 30, 30)))
    losses = []
    for _ in range(5):
        loss = engine(input_ids=ids, pixel_values=pixels, labels=labels).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9, losses
    after = weights(ds, engine)
    assert all(torch.isfinite(v).all() for v in after.values())
    q = next(k for k in after if k.startswith("language_model.") and k.endswith("layers.0.self_attn.q_proj.weight"))
    assert not torch.equal(before[q], after[q])
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("vision_tower."))
