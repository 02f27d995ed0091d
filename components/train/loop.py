"""The Ray Train worker loop: model and DeepSpeed engine set-up, then the epochs' optimizer steps.

Runs inside each Ray Train worker (`TorchTrainer(train_loop_per_worker=train_loop)`); DeepSpeed is
imported here, never in the driver. Shaped like torchtitan's trainer, its parts read and test alone:

    train_step          components/train/step.py         forward/backward/step of one optimizer step;
                                                          a non-finite loss or gradient norm skips it
    StepMetrics         components/train/metrics.py      loss, lr, grad norm, throughput, reduced over ranks
    CheckpointManager   components/train/checkpointing.py every rank's ZeRO shard + trainer state via
                                                          ray.train.report; restore on restart

A restarted run loads the last checkpoint and continues at the same optimizer step on the same data.
Skipped steps are counted (MLflow `skipped_steps`) and logged with their samples' ids; more than
`max_consecutive_skips` in a row stop the run before anything else is saved: rank 0 writes a stop file, all
return (a raised error would be retried by Ray Train's restarts), the driver raises NonFiniteStepsError.
"""

from __future__ import annotations

import json
import math
import tempfile

import torch
import torch.distributed as dist


def apply_recipe(model, cfg) -> None:
    """Freezing is the recipe's job (`TrainConfig.tune_*`): LLaVA-1.5's align trains the projector, its instruct
    adds the LLM; TinyLLaVA's recipes also train the tower, whole or from a layer on."""
    model.requires_grad_(False)
    if cfg.tune_projector == "full":
        model.multi_modal_projector.requires_grad_(True)
    if cfg.tune_llm == "full":
        model.language_model.requires_grad_(True)
    for module in trained_tower_parts(model, cfg.tune_vision, cfg.tune_vision_from_layer):
        module.requires_grad_(True)


def feature_depth(model) -> int:
    """How many of the model's tower layers reach its patch features (`model.towers.feature_depth`)."""
    from model.towers import feature_depth as depth

    return depth(len(model.vision_tower.encoder.layers), model.config.vision_feature_layer)


def trained_tower_parts(model, tune: str, from_layer: int | None) -> list:
    """The tower modules a recipe trains; never those that do not reach the features (the layers after the
    feature layer, the final norm, SigLIP's pooling head), which would hold parameters without gradients."""
    if tune == "frozen":
        return []
    vision = model.vision_tower  # transformers 5 keeps CLIP's and SigLIP's parts without a vision_model level
    depth = feature_depth(model)
    if tune == "partial":
        if not 0 <= from_layer < depth:
            raise ValueError(f"tune_vision_from_layer {from_layer} trains no layer: the features come from the "
                             f"tower's first {depth} layers (vision_feature_layer {model.config.vision_feature_layer})")
        return list(vision.encoder.layers[from_layer:depth])
    before = [m for m in (vision.embeddings, getattr(vision, "pre_layrnorm", None)) if m is not None]  # CLIP's pre-norm
    return before + list(vision.encoder.layers[:depth])


def parameter_groups(model, cfg) -> list[dict]:
    """The optimizer's groups: projector and tower at their own learning rates where set (TinyLLaVA's
    mm_projector_lr, vision_tower_lr), everything else at lr; frozen and empty groups left out."""
    def trainable(module):
        return [p for p in module.parameters() if p.requires_grad]

    groups = [{"name": "llm", "params": trainable(model.language_model), "lr": cfg.lr},
              {"name": "projector", "params": trainable(model.multi_modal_projector), "lr": cfg.projector_lr or cfg.lr},
              {"name": "vision", "params": trainable(model.vision_tower), "lr": cfg.vision_lr or cfg.lr}]
    return [g for g in groups if g["params"]]


def count_params(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "frozen_params": total - trainable}


def flops_per_token(model, cfg) -> float:
    """Training FLOPs per LLM token: 2N forward, 2N backward through activations, +2N weight grads where trained
    (the tower's, per image rather than per token, are left out)."""
    llm = sum(p.numel() for p in model.language_model.parameters())
    proj = sum(p.numel() for p in model.multi_modal_projector.parameters())
    return (6 if cfg.tune_llm == "full" else 4) * llm + (6 if cfg.tune_projector == "full" else 4) * proj


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_tflops(configured: float | None) -> float | None:
    if configured:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def planned_steps(plan: list[dict], cfg) -> int:
    steps = sum(e["micro_steps"] for e in plan) // cfg.grad_accum
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def build_model(cfg):
    """The init model with the phase's recipe applied, in training mode (a frozen tower stays in eval)."""
    from model.checkpoint import load_model

    loaded = load_model(cfg.init)
    if not loaded.multimodal:
        raise ValueError(f"{cfg.init} is not a multimodal bitllava model folder")
    model = loaded.model
    apply_recipe(model, cfg)
    if cfg.gradient_checkpointing:
        model.language_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if not cfg.trains_tower:
        model.vision_tower.eval()
    return loaded


def build_engine(cfg, model, total_steps: int, bf16: bool):
    """AdamW over the trainable parameters, cosine schedule with warm-up, inside a DeepSpeed engine."""
    import deepspeed
    from transformers import get_cosine_schedule_with_warmup

    from components.train.deepspeed_config import deepspeed_config
    from model.torch_build_lock import load_deepspeed_shm_op

    groups = parameter_groups(model, cfg)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    ds_config = deepspeed_config(cfg, bf16)
    if not cfg.use_gpu:  # the CPU backend JIT-builds its shared-memory all-reduce op inside init_distributed
        load_deepspeed_shm_op()
    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, model_parameters=params)
    return engine, scheduler, ds_config


def optimizer_steps(batches, grad_accum: int):
    """Consecutive groups of `grad_accum` micro-batches: each group is one optimizer step."""
    group = []
    for samples in batches:
        group.append(samples)
        if len(group) == grad_accum:
            yield group
            group = []
    assert not group, "an epoch's micro-steps are a multiple of grad_accum (plan_epochs)"


def to_device(group: list[list], pad_id: int, encode: str, device, bf16: bool, tokens: list):
    """The step's micro-batches collated and moved to `device`, one at a time; appends each one's token count."""
    from components.train.data import collate

    for samples in group:
        batch = {k: v.to(device) for k, v in collate(samples, pad_id, encode).items()}
        for key in ("pixel_values", "image_features"):
            if key in batch and bf16:
                batch[key] = batch[key].to(torch.bfloat16)
        tokens.append(int(batch["attention_mask"].sum()))
        yield batch


def train_loop(loop_config: dict) -> None:
    import deepspeed  # noqa: F401  (before quiet_worker_logs: importing it sets its logger's level)
    import ray.train

    from components.console import quiet_worker_logs
    from components.train.checkpointing import CheckpointManager
    from components.train.config import TrainConfig
    from components.train.data import micro_batches, shard_name
    from components.train.metrics import StepMetrics
    from components.train.mlflow_logging import PhaseLogger
    from components import storage
    from components.train.step import all_reduce_sum, stop_file, train_step

    quiet_worker_logs()
    cfg = TrainConfig(**loop_config["cfg"])
    plan, encode = loop_config["plan"], loop_config["encode"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if cfg.use_gpu else "cpu")
    bf16 = cfg.use_gpu

    loaded = build_model(cfg)
    model = loaded.model
    counts = count_params(model)
    total_steps = planned_steps(plan, cfg)
    engine, scheduler, ds_config = build_engine(cfg, model, total_steps, bf16)

    checkpoints = CheckpointManager(engine, rank, cfg.checkpoint_every)
    state = checkpoints.restore(ray.train.get_checkpoint())
    if rank == 0 and checkpoints.last_step is not None:
        print(f"[train] resumed from step {state.global_step} (epoch {state.epoch}, "
              f"micro-step {state.epoch_micro})", flush=True)

    logger = PhaseLogger(loop_config["run_id"], cfg) if rank == 0 else None
    if logger:
        logger.start(counts, ds_config, resumed_at=state.global_step)
        print(f"[train] {cfg.phase}: {counts['trainable_params']:,} trainable / {counts['frozen_params']:,} frozen "
              f"params, {world} workers, {total_steps} optimizer steps, ZeRO-{cfg.zero_stage}, "
              f"{'bf16' if bf16 else 'fp32'}", flush=True)

    step_metrics = StepMetrics(world, all_reduce_sum, flops_per_token(model, cfg), peak_tflops(cfg.peak_tflops))
    metrics = {}  # the last applied step's, with the skip count (what a checkpoint reports, the final_* metrics)
    for epoch, epoch_plan in enumerate(plan):
        if state.global_step >= total_steps or epoch < state.epoch:
            continue
        if logger:
            logger.log_epoch(epoch, epoch_plan["samples_used"], epoch_plan["samples_dropped"], world)
        rows = iter(ray.train.get_dataset_shard(shard_name(rank, epoch)).iter_rows())
        batches = micro_batches(rows, epoch_plan["rows"][rank], epoch_plan["micro_steps"], cfg.per_device_batch,
                                cfg.seed, epoch, cfg.group_by_length, group_batches=world)
        for index, group in enumerate(optimizer_steps(batches, cfg.grad_accum)):
            # Steps already trained on (before a restart) are read but skipped: same data order on resume.
            if state.global_step >= total_steps:
                break
            if epoch == state.epoch and (index + 1) * cfg.grad_accum <= state.epoch_micro:
                continue
            tokens = []  # each micro-batch's non-pad tokens, filled as train_step draws them
            batches_on_device = to_device(group, loaded.tokenizer.pad_token_id, encode, device, bf16, tokens)
            result = train_step(engine, batches_on_device, world, z_loss_coef=cfg.z_loss)
            state.global_step += 1
            state.epoch, state.epoch_micro = epoch, (index + 1) * cfg.grad_accum
            state.skips.record(state.global_step, result.skipped)
            z_losses = result.z_losses or [None] * len(result.losses)
            for loss, z, n_tokens, samples in zip(result.losses, z_losses, tokens, group):
                step_metrics.add(loss, n_tokens, len(samples), z)
            step = step_metrics.reduce(state.global_step, scheduler.get_last_lr()[0], result.grad_norm,
                                       state.skips.total)
            if logger:
                logger.log_step(step)  # a skipped step's loss and grad_norm as they were: NaN / inf
            step_metrics.reset()
            if not result.skipped:
                metrics = step
            else:
                ids = _report_skip(state, result, group, world, logger)
                metrics = {**metrics, "skipped_steps": state.skips.total, "step": state.global_step}
                if state.skips.exceeded(cfg.max_consecutive_skips):
                    error = state.skips.error(cfg.max_consecutive_skips, state.global_step, ids, checkpoints.last_step)
                    if rank == 0:
                        print(f"[train] {error}", flush=True)
                    if logger:
                        logger.fail()
                    # returned, not raised: Ray Train restarts a worker group that raises (max_failures), and no
                    # restart gets past the same steps; every rank is here (the skip was agreed on), and the
                    # driver raises the error from the stop file (components/train/run.py)
                    if rank == 0:
                        storage.write_bytes_atomic(stop_file(cfg.out, loop_config["run_id"]),
                                                   json.dumps({"error": str(error)}).encode())
                    return
            if checkpoints.due(state.global_step, state.global_step >= total_steps):
                checkpoints.save(state, metrics)

    final_dir = loop_config["final_model_dir"]
    _save_final_model(engine, model, loaded, final_dir, rank, cfg.zero_stage)
    if logger:
        logger.finish(final_dir, metrics)


def _sample_label(sample) -> str:
    return f"{sample.id} (#{sample.idx})"


def _report_skip(state, result, group: list[list], world: int, logger) -> list[str]:
    """Gather the skipped step's sample ids from every rank (collective); rank 0 logs them.
    Returns the ids of the micro-batches whose loss was not finite (all of the step's if none was)."""
    mine = [([_sample_label(s) for s in samples], finite) for samples, finite in zip(group, result.finite_losses)]
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    suspects = [i for per_rank in gathered for ids, finite in per_rank if not finite for i in ids]
    if not suspects:
        suspects = [i for per_rank in gathered for ids, _ in per_rank for i in ids]
    if logger:
        reason = (f"non-finite loss on {result.ranks_nonfinite_loss} of {world} ranks"
                  if result.ranks_nonfinite_loss else "finite losses")
        where = ("samples of the micro-batches with a non-finite loss" if result.ranks_nonfinite_loss
                 else "all samples of the step")
        print(f"[train] step {state.global_step} skipped: {reason}, grad_norm={result.grad_norm}; "
              f"{state.skips.consecutive} skipped in a row, {state.skips.total} in all; {where}: "
              f"{', '.join(suspects)}", flush=True)
    return suspects


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
