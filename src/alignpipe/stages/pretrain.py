"""Pretrain a policy with one of the six PHF objectives (mle, filter, conditional, unlikelihood, rwr, awr).

Tokenizer: a byte-level BPE trained on the training corpus with the control tokens (or a Hugging Face one);
model: GPT-2 from config (or continued pretraining of a given model). A plain PyTorch loop (seeded, bf16 autocast
where the hardware has it, checkpoints with `--resume`, DDP when launched by torchrun), then the evaluation:
held-out loss in nats per character on plain validation text, and one-line completions of the held-out prompts
(PHF sampling: temperature 0.7, top-p 0.9) scored by the PEP8 oracle. Objectives: `alignpipe.algos.phf`;
training pieces (DDP, blocks, optimizer, checkpoints): `alignpipe.lm.training`.

What differs between tasks comes from the task (`alignpipe.tasks.Task`): the objectives it allows
(`pretrain_objectives`), how its train.jsonl rows become scored segments (`pretrain_documents`), the tokenizer and
model trained from scratch (`train_tokenizer`, `new_model`). On the chat task (`data.task: chat`) pretrain is
supervised fine-tuning of `init_model` (a chat model: its tokenizer has a chat template) on the data's conversations
through the chat template, objective `mle` only; its evaluation is the held-out loss on the templated val
conversations and one sampled answer per held-out prompt (the fraction that end their turn, answer length). The
arith task (a chat task with an oracle) trains a Llama from scratch with any objective (its answers scored by the
oracle; conditional training tags wrong ones) and is evaluated by its oracle (accuracy with its interval).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from alignpipe.core.config import (MAX_BATCH, MAX_CHARS, MAX_GPUS, MAX_LAYERS, MAX_PARAMS, MAX_ROWS, MAX_SEED,
                                   MAX_STEPS, MAX_THREADS, MAX_TOKENS, MAX_VOCAB, MAX_WIDTH, StageConfig, field)
from alignpipe.lm.policy import Sampling
from alignpipe.lm.tokenizers import INDENT_SPLITS
from alignpipe.stages import Input

INPUTS = (Input("data", "data", "dataset directory (train.jsonl, val.jsonl, prompts.jsonl)"),)
METRICS = ("heldout_loss", "violations_per_char", "zero_violation_frac", "tokens_per_s", "train_tokens", "seconds")
# What the stage reports for a task without an oracle (chat; alignpipe.run.runner.required_metrics).
JUDGED_METRICS = ("heldout_loss", "ended_frac", "tokens_per_s", "train_tokens", "seconds")
# The few metrics `dvc metrics show` lists (metrics_headline.json; fnmatch patterns); metrics.json has all.
HEADLINE = ("heldout_loss", "violations_per_char", "zero_violation_frac", "seconds")

Objective = Literal["mle", "filter", "conditional", "unlikelihood", "rwr", "awr"]


@dataclass(frozen=True)
class Config(StageConfig):
    SECTION: ClassVar[str] = "pretrain"
    RENAMED: ClassVar[dict[str, str]] = {
        "lr": "learning_rate", "warmup_frac": "warmup_ratio", "schedule": "lr_scheduler_type",
        "grad_clip": "max_grad_norm", "eval_prompts": "n_eval_prompts", "log_every": "logging_steps",
        "save_every": "save_steps", "compile": "torch_compile", "eval_temperature": "sampling.temperature",
        "eval_top_p": "sampling.top_p", "eval_max_new_tokens": "sampling.max_new_tokens",
        "eval_max_prompt_tokens": "sampling.max_prompt_tokens"}

    objective: Objective = field("conditional", "PHF objective: mle, filter, conditional, unlikelihood, rwr, awr")
    # Model and tokenizer
    tokenizer: str = field("", "Hugging Face tokenizer id or path; empty: train a byte-level BPE on train.jsonl")
    vocab_size: int = field(2048, "BPE vocabulary size when training the tokenizer (control tokens included)",
                            ge=260, le=MAX_VOCAB)
    tokenizer_indent: Literal[INDENT_SPLITS] = field(
        "line", "trained BPE's split of a line break and indentation: line (newline + whole indent one pre-token), "
        "merged (GPT-2's) or units (4-space units); alignpipe.lm.tokenizers.train_tokenizer, base_model.md")
    init_model: str = field("", "Hugging Face model id or path to continue pretraining; empty: GPT-2 from scratch")
    n_embd: int = field(192, "GPT-2 width (from scratch)", ge=1, le=MAX_WIDTH)
    n_layer: int = field(4, "GPT-2 layers (from scratch)", ge=1, le=MAX_LAYERS)
    n_head: int = field(3, "GPT-2 attention heads (from scratch)", ge=1, le=MAX_LAYERS)
    # Training budget
    seq_len: int = field(256, "tokens per training sequence (documents are packed, EOS-separated)", ge=1, le=MAX_TOKENS)
    batch_size: int = field(16, "sequences per step and process", ge=1, le=MAX_BATCH)
    max_steps: int = field(300, "optimizer steps (the token budget is max_steps x batch_size x seq_len x gpus)",
                           ge=1, le=MAX_STEPS)
    learning_rate: float = field(2e-3, "peak AdamW learning rate", gt=0)
    warmup_ratio: float = field(0.01, "fraction of steps of linear warmup (PHF: 0.01), then decay to 0", ge=0, lt=1)
    lr_scheduler_type: Literal["linear", "cosine"] = field("linear", "decay after warmup (PHF: linear)")
    weight_decay: float = field(0.1, "AdamW weight decay on matrices (PHF: 0.1)", ge=0)
    max_grad_norm: float = field(1.0, "gradient norm clip", gt=0)
    precision: Literal["auto", "bf16", "fp32"] = field("auto", "auto: bf16 autocast where the hardware has it")
    torch_compile: bool = field(False, "torch.compile the model")
    threads: int = field(0, "CPU threads for torch (0: torch's default, one per core)", ge=0, le=MAX_THREADS)
    # Objective hyperparameters (PHF PEP8 configs: configs/pep8/*.yml of tomekkorbak/pretraining-with-human-feedback)
    threshold: float = field(0.0, "segment score (violations/char) at or below which a segment is aligned", ge=0)
    filter_threshold: float = field(0.002361, "filter: drop documents whose violations/char exceed this", ge=0)
    drop_token_prob: float = field(0.1, "conditional: probability of leaving a segment without a control token",
                                   ge=0, lt=1)
    ul_alpha: float = field(0.01, "unlikelihood: weight of the unlikelihood term on misaligned tokens", ge=0)
    rwr_beta: float = field(10.0, "rwr: temperature of the reward weights exp(R / beta)", gt=0)
    awr_alpha: float = field(0.05, "awr: weight of the LM term (1 - alpha weighs the value loss)", gt=0, le=1)
    awr_beta: float = field(1.0, "awr: temperature of the advantage weights exp((R - V) / beta)", gt=0)
    # Evaluation
    n_eval_prompts: int = field(512, "held-out prompts sampled for the oracle evaluation (>= 512 for the metrics)",
                                ge=1, le=MAX_ROWS)
    sampling: Sampling = field(Sampling(), "how the evaluation samples a completion per held-out prompt "
                               "(max_prompt_tokens capped by the model's positions)")
    eval_val_chars: int = field(200_000, "characters of val.jsonl for the held-out loss (0: all)", ge=0, le=MAX_CHARS)
    # Run
    logging_steps: int = field(10, "steps between logged training metrics", ge=1, le=MAX_STEPS)
    save_steps: int = field(100, "steps between checkpoints (one is always written at the end)", ge=1, le=MAX_STEPS)
    checkpoint_dir: str = field("checkpoints/pretrain", "checkpoints (outside the published output)")
    resume: bool = field(False, "resume from the latest checkpoint in checkpoint_dir")
    seed: int = field(0, "seed of initialisation, data order, token dropping and sampling", ge=0, le=MAX_SEED)
    gpus: int = field(1, "processes to train with (the launcher runs torchrun/accelerate with this many)",
                      ge=0, le=MAX_GPUS)

    def __post_init__(self):
        super().__post_init__()
        self.check(self.n_embd % self.n_head == 0, "n_embd", f"must be a multiple of n_head={self.n_head}")
        # GPT-2's parameter count: 12 d^2 per layer, and the token and position embeddings
        n_params = 12 * self.n_layer * self.n_embd ** 2 + (self.vocab_size + self.seq_len) * self.n_embd
        self.check(bool(self.init_model) or n_params <= MAX_PARAMS, "n_layer",
                   f"with n_embd={self.n_embd} builds a {n_params:.2g}-parameter model from scratch; at most "
                   f"{MAX_PARAMS:.0e}")


# Config keys that change the trained weights: a checkpoint only resumes a run that agrees on all of them.
TRAINING_KEYS = ("objective", "tokenizer", "vocab_size", "tokenizer_indent", "init_model", "n_embd", "n_layer",
                 "n_head", "seq_len", "batch_size", "max_steps", "learning_rate", "warmup_ratio", "lr_scheduler_type",
                 "weight_decay", "max_grad_norm", "precision", "threshold", "filter_threshold", "drop_token_prob",
                 "ul_alpha", "rwr_beta", "awr_alpha", "awr_beta", "seed", "gpus")


def policy_meta(cfg: Config):
    """How the trained policy is prompted: conditional models end the prompt on <|aligned|> and never sample
    <|misaligned|>; the others never sample either control token."""
    from alignpipe.lm.policy import PolicyMeta
    from alignpipe.lm.tokenizers import ALIGNED, CONTROL_TOKENS, MISALIGNED

    extra = {"stage": "pretrain", "threshold": cfg.threshold, "segment": "line (control token before its newline)"}
    if cfg.objective == "conditional":
        return PolicyMeta(objective="conditional", prompt_suffix=ALIGNED, bad_words=(MISALIGNED,),
                          strip_tokens=CONTROL_TOKENS, extra=extra)
    return PolicyMeta(objective=cfg.objective, bad_words=CONTROL_TOKENS, strip_tokens=CONTROL_TOKENS, extra=extra)


def build_token_stream(rows: list[dict], tok, cfg: Config, seed: int, task=None, where: str = "train.jsonl"):
    """The training token stream: the rows as the task's documents (`Task.pretrain_documents`: a score and
    segments; `task` default pep8), shuffled (filtered by score for `filter`), as EOS + segments, with a control
    token before each segment for `conditional`. Returns (ids, scores, stats): numpy arrays of token ids and of
    each token's segment score (violations/char), and counts."""
    import numpy as np

    from alignpipe.algos.phf import control_token, keep_document
    from alignpipe.lm.tokenizers import control_ids
    from alignpipe.tasks import DEFAULT_TASK, get_task

    docs = (task or get_task(DEFAULT_TASK)).pretrain_documents(rows, tok, where)
    rng = np.random.default_rng(seed)
    if cfg.objective == "filter":
        docs = [d for d in docs if keep_document(d[0], cfg.filter_threshold)]
    docs = [docs[i][1] for i in rng.permutation(len(docs))]
    flat = [s for segs in docs for s in segs]
    encoded = tok([s.text for s in flat], add_special_tokens=False)["input_ids"]
    conditional = cfg.objective == "conditional"
    aligned_id, misaligned_id = control_ids(tok)
    keep_token = rng.random(len(flat)) >= cfg.drop_token_prob
    ids: list[int] = []
    scores: list[float] = []
    k = 0
    n_aligned = 0
    for segs in docs:
        ids.append(tok.eos_token_id)
        scores.append(0.0)
        for seg in segs:
            is_aligned = control_token(seg.score, cfg.threshold, "a", "m") == "a"
            n_aligned += is_aligned
            if conditional and keep_token[k]:
                ids.append(aligned_id if is_aligned else misaligned_id)
                scores.append(seg.score)
            ids.extend(encoded[k])
            scores.extend([seg.score] * len(encoded[k]))
            k += 1
    stats = {"n_train_docs": len(docs), "n_segments": len(flat), "aligned_segment_frac": n_aligned / max(len(flat), 1)}
    return np.asarray(ids, dtype=np.int64), np.asarray(scores, dtype=np.float32), stats


def _fingerprint(cfg: Config) -> dict:
    return {k: getattr(cfg, k) for k in TRAINING_KEYS}


def heldout_loss(model, tok, texts: list[str], seq_len: int, batch_size: int = 16, dtype=None) -> dict[str, float]:
    """Nats per character of plain `texts` (each scored as EOS + text, in windows of `seq_len` that overlap by one
    token so every token is predicted once). Control-token logits are masked out: the result is the loss of a
    proper distribution over plain text (the policy sampled with both control tokens banned), comparable across
    objectives and tokenizations."""
    from alignpipe.algos.phf import nats_per_char
    from alignpipe.lm.heldout import heldout_nll
    from alignpipe.lm.tokenizers import control_ids

    total, n_tokens = heldout_nll(model, tok, texts, seq_len, stride=seq_len - 1, batch_size=batch_size,
                                  prepend_eos=True, banned_ids=control_ids(tok), dtype=dtype)
    chars = sum(len(t) for t in texts)
    return {"heldout_loss": nats_per_char(total, chars), "heldout_nats_per_token": total / max(n_tokens, 1),
            "heldout_chars_per_token": chars / max(n_tokens, 1)}


def _val_texts(data_dir: Path, max_chars: int, tok=None) -> list[str]:
    """val.jsonl's texts (chat: each conversation through `tok`'s chat template), up to `max_chars` (0: all)."""
    from alignpipe.core.io import read_jsonl

    texts, total = [], 0
    for row in read_jsonl(data_dir / "val.jsonl"):
        if max_chars and total >= max_chars:
            break
        text = tok.apply_chat_template(row["messages"], tokenize=False) if "messages" in row else row["text"]
        texts.append(text)
        total += len(text)
    return texts


def check_task(cfg: Config, task) -> None:
    """The objectives the task trains with (`Task.pretrain_objectives`: chat is mle only)."""
    from alignpipe.core.errors import ConfigError

    allowed = task.pretrain_objectives()
    if cfg.objective not in allowed:
        raise ConfigError("pretrain.objective", f"task {task} trains with {', '.join(allowed)} only "
                          f"({cfg.objective} needs oracle scores of the corpus' segments, which it has not)")
    if task.pretrain_needs_init_model() and not cfg.init_model:
        raise ConfigError("pretrain.init_model", f"task {task} continues a chat model (a Hugging Face id or "
                          "directory whose tokenizer has a chat template); a GPT-2 from scratch has none")


def prepare_checkpoints(cfg: Config, main: bool) -> Path | None:
    """The newest complete checkpoint to resume from (`alignpipe.lm.training.resume_checkpoint`: None without
    `resume`, or when there is none); a fresh run clears the stage's own old ones and their tokenizer."""
    import shutil

    from alignpipe.lm.training import STEP_CHECKPOINT, resume_checkpoint

    latest = resume_checkpoint(cfg, cfg.checkpoint_dir, "step", STEP_CHECKPOINT, must_exist=False)
    if main and not cfg.resume:
        shutil.rmtree(Path(cfg.checkpoint_dir) / "tokenizer", ignore_errors=True)
    return latest


def prepare_tokenizer(cfg: Config, rows: list[dict], resuming: bool, main: bool, task):
    """The checkpoint's tokenizer when resuming, else `cfg.tokenizer` or `cfg.init_model`'s (control tokens added),
    else the task's trained on the training texts (`Task.train_tokenizer`: a BPE); the main process saves it
    beside the checkpoints."""
    from alignpipe.lm.tokenizers import load_tokenizer

    ckpt_dir = Path(cfg.checkpoint_dir)
    if resuming:
        tok = load_tokenizer(ckpt_dir / "tokenizer", add_control_tokens=True)
    elif cfg.tokenizer or cfg.init_model:  # continuing a model: its own tokenizer unless another is named
        tok = load_tokenizer(cfg.tokenizer or cfg.init_model, add_control_tokens=True)
    else:
        tok = task.train_tokenizer((r["text"] for r in rows), cfg)
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(ckpt_dir / "tokenizer"))
    return tok


def train(cfg: Config, net, opt, sched, data, proc, dtype, start_step: int, checkpoint) -> tuple[float, float]:
    """Steps `start_step` to `max_steps` of the PHF objective on `data` = (blocks, block scores, order), each process
    taking its slice of the global batch; `checkpoint(step, last logged loss)` every `save_steps` steps and at the
    end. Returns (the last logged loss, training seconds)."""
    import contextlib
    import time

    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from alignpipe.algos.phf import token_loss
    from alignpipe.tracking import runs

    blocks, block_scores, order = data
    train_net = torch.nn.parallel.DistributedDataParallel(net) if proc.world > 1 else net
    forward = torch.compile(train_net) if cfg.torch_compile else train_net
    hp = {k: getattr(cfg, k) for k in ("threshold", "ul_alpha", "rwr_beta", "awr_alpha", "awr_beta")}
    device_type = proc.device.split(":")[0]
    global_batch, rank = cfg.batch_size * proc.world, proc.rank
    tokens_per_step = global_batch * cfg.seq_len
    net.train()
    t_start = time.perf_counter()
    t_log, last_logged = t_start, start_step
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="pretrain",
               unit="step", disable=not proc.main, mininterval=5)
    loss_value = float("nan")
    for step in bar:
        idx = order[step * global_batch + rank * cfg.batch_size: step * global_batch + (rank + 1) * cfg.batch_size]
        x = blocks[idx].to(proc.device)
        s = block_scores[idx].to(proc.device)
        with torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            logits, values = forward(x)
        loss, logs = token_loss(cfg.objective, logits[:, :-1], x[:, 1:], s[:, 1:],
                                None if values is None else values[:, :-1], **hp)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        log_step = done % cfg.logging_steps == 0 or done == cfg.max_steps
        if log_step and proc.world > 1:  # every rank joins: log the global batch's loss, as one process would
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= proc.world
        if proc.main and log_step:
            loss_value = float(loss.detach())
            now = time.perf_counter()
            tps = (done - last_logged) * tokens_per_step / max(now - t_log, 1e-9)
            t_log, last_logged = now, done
            runs.log_metrics({"train/loss": loss_value, "train/learning_rate": sched.get_last_lr()[0],
                              "train/tokens_per_s": tps, "train/grad_norm": float(grad_norm),
                              **{f"train/{k}": float(v) for k, v in logs.items()}}, step=done)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tps:.0f}")
        if done % cfg.save_steps == 0 or done == cfg.max_steps:
            checkpoint(done, loss_value)
    bar.close()
    return loss_value, time.perf_counter() - t_start


def _chat_samples(cfg: Config, policy, data_dir: Path, sampling, task, out_dir: Path) -> dict[str, float]:
    """One answer per held-out conversation (chat template, ending the turn), written to samples.jsonl."""
    from alignpipe.core.io import read_jsonl, write_jsonl
    from alignpipe.oracle.chat_eval import sample_chat

    prompts = [r["prompt"] for r in read_jsonl(data_dir / "prompts.jsonl")][:cfg.n_eval_prompts]
    got = sample_chat(policy, prompts, sampling, cfg.seed, task)
    write_jsonl(out_dir / "samples.jsonl", ({"prompt": p, "completion": c, "ended": e}
                                            for p, c, e in zip(prompts, got.completions, got.ended)))
    n = max(len(prompts), 1)
    return {"ended_frac": sum(got.ended) / n, "empty_frac": sum(not c for c in got.completions) / n,
            "mean_answer_tokens": sum(len(c) for c in got.completion_ids) / n}


def evaluate(cfg: Config, lm, tok, data_dir: Path, dtype, out_dir: Path, task) -> dict[str, float]:
    """Held-out loss on val.jsonl and the oracle on one-line completions of the held-out prompts (written to
    `out_dir/samples.jsonl`); saves the policy into `out_dir`."""
    import torch

    from alignpipe.core.io import write_jsonl
    from alignpipe.lm.policy import save_policy
    from alignpipe.oracle.policy_eval import evaluate_policy, load_prompts

    lm.eval()
    meta = policy_meta(cfg)
    metrics = heldout_loss(lm, tok, _val_texts(data_dir, cfg.eval_val_chars, tok if task.conversational() else None),
                           cfg.seq_len, dtype=dtype)
    positions = lm.config.max_position_embeddings
    max_prompt = min(cfg.sampling.max_prompt_tokens, positions - cfg.sampling.max_new_tokens)
    sampling = dataclasses.replace(cfg.sampling, max_prompt_tokens=max_prompt)
    if task.oracle() is None:  # no oracle to score the answers: their samples and how they ended
        metrics.update(_chat_samples(cfg, (lm, tok, meta), data_dir, sampling, task, out_dir))
        save_policy(lm, tok, meta, out_dir)
        return metrics
    prompts = load_prompts(data_dir, cfg.n_eval_prompts)
    device_type = next(lm.parameters()).device.type
    with (torch.autocast(device_type, dtype=dtype) if dtype is not None else torch.no_grad()):
        oracle, details = evaluate_policy((lm, tok, meta), prompts, sampling, seed=cfg.seed,
                                          progress="pretrain: sampling", task=task)
    metrics.update(oracle)
    write_jsonl(out_dir / "samples.jsonl", (
        {"source": p.get("source", ""), "prompt": p["prompt"], "completion": c, "violations_per_char": v}
        for p, c, v in zip(prompts, details["completions"], details["scores"])))
    save_policy(lm, tok, meta, out_dir)
    return metrics


def run(cfg: Config, inputs: dict[str, Path | None], out_dir: Path) -> dict[str, float]:
    """Train, evaluate and save the policy (safetensors + tokenizer + alignpipe.json) into `out_dir`."""
    import torch
    import torch.distributed as dist

    from alignpipe.core.io import read_jsonl
    from alignpipe.tasks import task_of
    from alignpipe.lm import training
    from alignpipe.lm.models import build_model, device_and_dtype, training_flops_per_token

    data_dir = Path(inputs["data"])
    task = task_of(data_dir)
    check_task(cfg, task)
    device, dtype = device_and_dtype(cfg.precision)
    proc = training.setup_process(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    latest = prepare_checkpoints(cfg, proc.main)
    rows = read_jsonl(data_dir / "train.jsonl")
    task.check_pretrain_rows(rows, data_dir / "train.jsonl")  # before a tokenizer is trained on them
    tok = prepare_tokenizer(cfg, rows, latest is not None, proc.main, task)
    ids, scores, stats = build_token_stream(rows, tok, cfg, cfg.seed, task, data_dir / "train.jsonl")
    data = training.token_blocks(ids, scores, cfg.seq_len, cfg.batch_size * proc.world, cfg.max_steps, cfg.seed + 1)

    lm = (build_model(tok, cfg.n_embd, cfg.n_layer, cfg.n_head, max(cfg.seq_len, 256), cfg.init_model)
          if cfg.init_model else task.new_model(tok, cfg))
    net = training.lm_with_value(lm, cfg.objective == "awr").to(proc.device)
    opt, sched = training.make_optimizer(net, cfg.learning_rate, cfg.weight_decay, cfg.warmup_ratio, cfg.max_steps,
                                         cfg.lr_scheduler_type)
    start_step = 0
    if latest is not None:
        start_step = training.load_checkpoint(latest, net, opt, sched, _fingerprint(cfg), proc.device,
                                              ignore=("max_steps",))

    def checkpoint(step: int, loss: float) -> None:
        if proc.main:
            logged = loss if loss == loss else None  # NaN: no step logged yet
            training.save_checkpoint(Path(cfg.checkpoint_dir), step, net, opt, sched, _fingerprint(cfg),
                                     progress={"final_train_loss": logged})

    loss_value, train_seconds = train(cfg, net, opt, sched, data, proc, dtype, start_step, checkpoint)
    if start_step == cfg.max_steps:  # resumed from the final checkpoint: its loss, as the uninterrupted run saw it
        loss_value = training.checkpoint_progress(latest).get("final_train_loss") or float("nan")
        checkpoint(cfg.max_steps, loss_value)

    metrics: dict[str, float] = {}
    if proc.main:
        metrics = evaluate(cfg, lm, tok, data_dir, dtype, out_dir, task)
        tokens_per_step = cfg.batch_size * proc.world * cfg.seq_len
        trained_tokens = (cfg.max_steps - start_step) * tokens_per_step
        tokens_per_s = trained_tokens / train_seconds if trained_tokens else 0.0
        metrics.update({
            "tokens_per_s": tokens_per_s,
            "train_tokens": cfg.max_steps * tokens_per_step,
            "train_seconds": train_seconds,
            "train_tflops": training_flops_per_token(lm, cfg.seq_len) * tokens_per_s / 1e12,
            "final_train_loss": loss_value,
            "params": sum(p.numel() for p in lm.parameters()),
            "resumed_from_step": start_step,
            **stats,
        })
        metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and v != v)}
    if proc.world > 1:
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics
