"""DPO as TRL runs it: our `DPOConfig` for TRL's DPOTrainer (the loss itself is TRL's; see `alignpipe.stages.dpo`)."""

from __future__ import annotations

from pathlib import Path


def trl_config(cfg, output_dir: str | Path):
    """Our DPOConfig: the arguments the pair trainers share (`alignpipe.algos.preference.trainer_args`: no gradient
    checkpointing, length-grouped batches, max_length = prompt + completion, bf16 only when asked; bf16 is slower
    than fp32 for small models on CPU, see benchmarks/results/dpo_throughput.md) plus DPO's own: the loss, and the
    reference log-probabilities precomputed (one no-grad pass instead of a reference forward on every step).
    `cfg` is an `alignpipe.stages.dpo.Config`."""
    from trl import DPOConfig

    from alignpipe.algos.preference import trainer_args

    return DPOConfig(
        **trainer_args(cfg, output_dir),
        loss_type=[cfg.loss_type] + (["sft"] if cfg.sft_weight > 0 else []),
        loss_weights=[1.0, cfg.sft_weight] if cfg.sft_weight > 0 else None,
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        precompute_ref_batch_size=max(64, cfg.batch_size),
    )
