"""An explicit DeepSpeed config (no "auto" fields: those are filled only by the HF Trainer).

LLaVA's scripts/zero2.json and zero3.json, with every value set from the TrainConfig.
"""

from __future__ import annotations


def deepspeed_config(cfg, bf16: bool) -> dict:
    zero = {
        "stage": cfg.zero_stage,
        "overlap_comm": cfg.use_gpu,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e7,
    }
    if cfg.zero_stage == 2:
        zero.update(allgather_partitions=True, allgather_bucket_size=5e7, reduce_scatter=True)
    else:
        zero.update(stage3_prefetch_bucket_size=5e7, stage3_param_persistence_threshold=1e5,
                    stage3_max_live_parameters=1e9, stage3_max_reuse_distance=1e9,
                    stage3_gather_16bit_weights_on_model_save=True)
    return {
        "train_micro_batch_size_per_gpu": cfg.per_device_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.global_batch,
        "gradient_clipping": cfg.max_grad_norm,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW: DeepSpeed's fused Adam needs CUDA
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
