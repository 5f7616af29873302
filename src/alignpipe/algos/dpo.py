"""DPO as TRL runs it: our `DPOConfig` for TRL's DPOTrainer (the loss itself is TRL's; see `alignpipe.stages.dpo`)."""

from __future__ import annotations

from pathlib import Path


def trl_config(cfg, output_dir: str | Path):
    """Our DPOConfig. Against TRL's defaults it turns gradient checkpointing off (a small model has memory to
    spare; recomputing the forward costs ~30%), precomputes the reference log-probabilities (one no-grad pass
    instead of a reference forward on every step), groups pairs of similar length into batches (less padding),
    bounds max_length to prompt + completion and uses bf16 only when asked (slower than fp32 for small models on
    CPU; see benchmarks/results/dpo_throughput.md). `cfg` is an `alignpipe.stages.dpo.Config`."""
    import torch
    from trl import DPOConfig

    from alignpipe.lm.models import bf16_supported

    return DPOConfig(
        output_dir=str(output_dir),
        loss_type=[cfg.loss_type] + (["sft"] if cfg.sft_weight > 0 else []),
        loss_weights=[1.0, cfg.sft_weight] if cfg.sft_weight > 0 else None,
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_steps,
        per_device_train_batch_size=cfg.batch_size,
        max_steps=cfg.max_steps,
        max_length=cfg.max_prompt_tokens + cfg.max_completion_tokens,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        precompute_ref_batch_size=max(64, cfg.batch_size),
        activation_checkpointing=False,
        bf16=cfg.bf16 and bf16_supported(),
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        length_column_name="length",
        remove_unused_columns=not cfg.group_by_length,  # the sampler reads the `length` column
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        report_to=[],
        disable_tqdm=False,
        dataset_num_proc=None,
    )
