"""DPO training throughput: TRL's DPOTrainer defaults against the dpo stage's configuration, same model, pairs,
batch, steps, learning rate, beta and seed.

(a) TRL defaults: `DPOConfig` with only the shared settings (batch, steps, learning rate, beta, seed, no saving or
    reporting) and `ref_model=None`, so TRL reloads the reference from the policy's directory; its defaults then
    include gradient checkpointing, bf16, max_length 1024 and a reference forward on every step.
(b) ours: `alignpipe.algos.dpo.trl_config` from params.yaml's `dpo` section (gradient checkpointing off, reference
    log-probabilities precomputed before training, max_length = prompt + completion budget, an explicit reference).

Each contender runs `--repeats` times, taking turns; reported: the median samples/s of the training loop
(`trainer.train()`), the median end-to-end samples/s (building the trainer, which includes tokenizing and, for (b),
the precompute pass, plus training), their ratios, and the final training loss (mean of the last 5 logged steps).

    python benchmarks/dpo_throughput.py --out benchmarks/results/dpo_throughput.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py (scripts run with benchmarks/ on sys.path)


def run_once(kind: str, cfg, policy_dir: Path, pairs: list[dict], workdir: Path) -> dict[str, float]:
    """Build and train one trainer; returns timings and the final loss."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from alignpipe.lm.policy import load_policy
    from alignpipe.stages import dpo

    torch.manual_seed(cfg.seed)
    model, tok, _ = load_policy(policy_dir)
    start = time.perf_counter()
    if kind == "trl_defaults":
        args = DPOConfig(output_dir=str(workdir), per_device_train_batch_size=cfg.batch_size,
                         max_steps=cfg.max_steps, learning_rate=cfg.learning_rate, beta=cfg.beta,
                         loss_type=[cfg.loss_type], seed=cfg.seed, logging_steps=1, save_strategy="no",
                         report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
        dataset = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    else:
        ref, _, _ = load_policy(policy_dir)
        ours = dpo.Config(**{**cfg.to_dict(), "logging_steps": 1, "save_steps": cfg.max_steps + 1})
        trainer = dpo.make_trainer(ours, model, ref, tok, pairs, workdir)
        trainer.args.disable_tqdm = True
    built = time.perf_counter()
    trainer.train()
    done = time.perf_counter()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    n = cfg.max_steps * cfg.batch_size
    return {
        "train_samples_per_s": n / (done - built),
        "end_to_end_samples_per_s": n / (done - start),
        "setup_s": built - start,
        "train_s": done - built,
        "final_loss": sum(losses[-5:]) / len(losses[-5:]),
        "gradient_checkpointing": float(trainer.args.gradient_checkpointing),
        "bf16": float(trainer.args.bf16),
        "precompute": float(trainer.args.precompute_ref_log_probs),
        "max_length": float(trainer.args.max_length or 0),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="artifacts/pretrain")
    p.add_argument("--prefs", default="artifacts/label")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default: 30)")
    p.add_argument("--batch-size", type=int, default=0, help="pairs per step (0: params.yaml dpo.batch_size)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the result (markdown) to this file")
    args = p.parse_args(argv)

    import os

    os.environ.setdefault("TQDM_DISABLE", "1")
    import random

    import torch
    import transformers
    import trl

    from alignpipe.algos import preference
    from alignpipe.core.config import build_config, load_params
    from alignpipe.lm.policy import load_policy
    from alignpipe.stages import dpo

    transformers.logging.set_verbosity_error()
    cfg = build_config(dpo.Config, load_params(args.params))
    cfg = dpo.Config(**{**cfg.to_dict(), "max_steps": args.steps,
                        "batch_size": args.batch_size or cfg.batch_size})
    _, tok, meta = load_policy(args.policy)
    pairs = preference.read_pairs(args.prefs)
    random.Random(cfg.seed).shuffle(pairs)
    pairs = preference.format_pairs(pairs[:cfg.batch_size * cfg.max_steps], tok, meta, cfg.max_prompt_tokens)

    results: dict[str, list[dict]] = {"trl_defaults": [], "ours": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for kind in results:
                out = run_once(kind, cfg, Path(args.policy), pairs, Path(tmp) / f"{kind}-{r}")
                results[kind].append(out)
                print(f"run {r} {kind}: {out['train_samples_per_s']:.2f} samples/s (train), "
                      f"{out['end_to_end_samples_per_s']:.2f} (end to end), final loss {out['final_loss']:.4f}",
                      flush=True)

    med = {k: {m: statistics.median(o[m] for o in v) for m in v[0]} for k, v in results.items()}
    a, b = med["trl_defaults"], med["ours"]
    lines = [
        "# DPO throughput: TRL DPOTrainer defaults vs the dpo stage's configuration",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores (shared with other jobs: timings are noisy), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"trl {trl.__version__}. Policy `{args.policy}`, {len(pairs)} pairs from `{args.prefs}`, "
        f"batch {cfg.batch_size}, {cfg.max_steps} steps, lr {cfg.learning_rate}, beta {cfg.beta}, "
        f"loss {cfg.loss_type}, seed {cfg.seed}; median of {args.repeats} runs each, taking turns.",
        "",
        "| | gradient ckpt | bf16 | precomputed ref | max_length | train samples/s | end-to-end samples/s "
        "| setup s | train s | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in (("(a) TRL defaults", a), ("(b) ours", b)):
        lines.append(f"| {name} | {bool(m['gradient_checkpointing'])} | {bool(m['bf16'])} | {bool(m['precompute'])} "
                     f"| {int(m['max_length'])} | {m['train_samples_per_s']:.2f} | "
                     f"{m['end_to_end_samples_per_s']:.2f} | {m['setup_s']:.1f} | {m['train_s']:.1f} "
                     f"| {m['final_loss']:.4f} |")
    lines += [
        "",
        f"Speed-up (b)/(a): training loop **{b['train_samples_per_s'] / a['train_samples_per_s']:.2f}x**, "
        f"end to end {b['end_to_end_samples_per_s'] / a['end_to_end_samples_per_s']:.2f}x. "
        f"Final loss (a) {a['final_loss']:.4f} vs (b) {b['final_loss']:.4f} "
        f"(difference {abs(a['final_loss'] - b['final_loss']):.4f}).",
        "",
        "Per run: " + "; ".join(f"{k} {o['train_samples_per_s']:.2f}/{o['end_to_end_samples_per_s']:.2f}"
                                for k, v in results.items() for o in v) + " (train/end-to-end samples/s).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
