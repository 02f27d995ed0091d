"""The Ray Train worker loop: DeepSpeed engine, streaming batches, checkpoints, MLflow on rank 0.

Runs inside each Ray Train worker (`TorchTrainer(train_loop_per_worker=train_loop)`); DeepSpeed is
imported here, never in the driver. Every rank saves its ZeRO shard into a temporary folder, then
all ranks report it together (`ray.train.report` is collective), so a checkpoint on storage holds
every shard; a restarted run loads it and continues at the same optimizer step on the same data.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

import torch
import torch.distributed as dist

TRAINER_STATE = "trainer_state.json"
DS_TAG = "deepspeed"


def apply_recipe(model, phase: str) -> None:
    """Freezing is the recipe's job: the tower is always frozen; align trains the projector; instruct adds the LLM."""
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    if phase == "instruct":
        model.language_model.requires_grad_(True)


def count_params(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "frozen_params": total - trainable}


def flops_per_token(model, phase: str) -> float:
    """Training FLOPs per token: 2N forward, 2N backward through activations, +2N weight grads where trained."""
    llm = sum(p.numel() for p in model.language_model.parameters())
    proj = sum(p.numel() for p in model.multi_modal_projector.parameters())
    return (6 if phase == "instruct" else 4) * llm + 6 * proj


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_tflops(configured: float | None) -> float | None:
    if configured:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def _all_mean(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def _all_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def train_loop(loop_config: dict) -> None:
    import deepspeed
    import ray.train
    from transformers import get_cosine_schedule_with_warmup

    from components.console import quiet_worker_logs
    from components.train.config import TrainConfig
    from components.train.data import collate, micro_batches, shard_name
    from components.train.deepspeed_config import deepspeed_config
    from components.train.mlflow_logging import PhaseLogger
    from model.checkpoint import load_model

    quiet_worker_logs()  # after `import deepspeed`, which sets its logger's level
    cfg = TrainConfig(**loop_config["cfg"])
    plan, encode = loop_config["plan"], loop_config["encode"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if cfg.use_gpu else "cpu")
    bf16 = cfg.use_gpu

    loaded = load_model(cfg.init)
    model = loaded.model
    if not loaded.multimodal:
        raise ValueError(f"{cfg.init} is not a multimodal bitllava model folder")
    apply_recipe(model, cfg.phase)
    if cfg.gradient_checkpointing:
        model.language_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.vision_tower.eval()
    counts = count_params(model)

    total_micro = sum(e["micro_steps"] for e in plan)
    total_steps = total_micro // cfg.grad_accum
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    ds_config = deepspeed_config(cfg, bf16)
    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, model_parameters=params)

    state = {"global_step": 0, "epoch": 0, "epoch_micro": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag=DS_TAG)
            with open(os.path.join(d, TRAINER_STATE)) as f:
                state = json.load(f)
        if rank == 0:
            print(f"[train] resumed from step {state['global_step']} (epoch {state['epoch']}, "
                  f"micro-step {state['epoch_micro']})", flush=True)

    logger = PhaseLogger(loop_config["run_id"], cfg) if rank == 0 else None
    if logger:
        logger.start(counts, ds_config, resumed_at=state["global_step"])
        print(f"[train] {cfg.phase}: {counts['trainable_params']:,} trainable / {counts['frozen_params']:,} frozen "
              f"params, {world} workers, {total_steps} optimizer steps, ZeRO-{cfg.zero_stage}, "
              f"{'bf16' if bf16 else 'fp32'}", flush=True)

    fpt = flops_per_token(model, cfg.phase)
    peak = peak_tflops(cfg.peak_tflops)

    def save(metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag=DS_TAG)
            if rank == 0:
                with open(os.path.join(d, TRAINER_STATE), "w") as f:
                    json.dump(state, f)
            dist.barrier()
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    window = {"loss": 0.0, "tokens": 0, "samples": 0, "micro": 0, "start": time.perf_counter()}
    metrics = {}
    done = state["global_step"] >= total_steps
    for epoch, epoch_plan in enumerate(plan):
        if done or epoch < state["epoch"]:
            continue
        if logger:
            logger.log_epoch(epoch, epoch_plan["samples_used"], epoch_plan["samples_dropped"], world)
        rows = iter(ray.train.get_dataset_shard(shard_name(rank, epoch)).iter_rows())
        batches = micro_batches(rows, epoch_plan["rows"][rank], epoch_plan["micro_steps"], cfg.per_device_batch,
                                cfg.seed, epoch, cfg.group_by_length, group_batches=world)
        for micro, samples in enumerate(batches):
            # Batches already trained on (before a restart) are read but skipped: same data order on resume.
            if done:
                break
            if epoch == state["epoch"] and micro < state["epoch_micro"]:
                continue
            batch = {k: v.to(device) for k, v in collate(samples, loaded.tokenizer.pad_token_id, encode).items()}
            for key in ("pixel_values", "image_features"):
                if key in batch and bf16:
                    batch[key] = batch[key].to(torch.bfloat16)
            boundary = engine.is_gradient_accumulation_boundary()
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            window["loss"] += loss.item()
            window["tokens"] += int(batch["attention_mask"].sum())
            window["samples"] += len(samples)
            window["micro"] += 1
            state.update(epoch=epoch, epoch_micro=micro + 1)
            if not boundary:
                continue
            state["global_step"] += 1
            elapsed = time.perf_counter() - window["start"]
            loss_mean, = _all_mean([window["loss"] / window["micro"]])
            tokens, samples_n = _all_sum([window["tokens"], window["samples"]])
            grad_norm = engine.get_global_grad_norm()
            metrics = {
                "loss": loss_mean,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "tokens_per_s": tokens / elapsed,
                "samples_per_s": samples_n / elapsed,
                "step": state["global_step"],
            }
            if peak:
                metrics["mfu"] = metrics["tokens_per_s"] * fpt / (peak * 1e12 * world)
            if logger:
                logger.log_step(metrics)
            window = {"loss": 0.0, "tokens": 0, "samples": 0, "micro": 0, "start": time.perf_counter()}
            done = state["global_step"] >= total_steps
            if state["global_step"] % cfg.checkpoint_every == 0 or done:
                save(metrics)

    final_dir = loop_config["final_model_dir"]
    _save_final_model(engine, model, loaded, final_dir, rank, cfg.zero_stage)
    if logger:
        logger.finish(final_dir, metrics)


def _save_final_model(engine, model, loaded, final_dir: str, rank: int, zero_stage: int) -> None:
    """Consolidated full weights (gathered from ZeRO-3 partitions) as a from_pretrained-loadable folder."""
    import deepspeed

    from components.train.outputs import publish_folder
    from model.checkpoint import save_model
    from model.multimodal import BitLlavaForConditionalGeneration

    module = engine.module
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
    else:
        state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
    if rank == 0:
        fresh = BitLlavaForConditionalGeneration(module.config)
        fresh.load_state_dict(state, strict=True)
        with tempfile.TemporaryDirectory() as d:
            save_model(d, fresh, loaded.tokenizer, loaded.image_processor)
            publish_folder(d, final_dir)
        print(f"[train] final model -> {final_dir}", flush=True)
    dist.barrier()
