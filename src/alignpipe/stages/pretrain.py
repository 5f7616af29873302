"""Pretrain a policy with one of the six PHF objectives (mle, filter, conditional, unlikelihood, rwr, awr).

Tokenizer: a byte-level BPE trained on the training corpus with the control tokens (or a Hugging Face one);
model: GPT-2 from config (or continued pretraining of a given model). A plain PyTorch loop (seeded, bf16 autocast
where the hardware has it, checkpoints with `--resume`, DDP when launched by torchrun), then the evaluation:
held-out loss in nats per character on plain validation text, and one-line completions of the held-out prompts
(PHF sampling: temperature 0.7, top-p 0.9) scored by the PEP8 oracle. Objectives: `alignpipe.algos.phf`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from alignpipe.core.config import StageConfig, field
from alignpipe.stages import Input

INPUTS = (Input("data", "data", "dataset directory (train.jsonl, val.jsonl, prompts.jsonl)"),)
METRICS = ("heldout_loss", "violations_per_char", "zero_violation_frac", "tokens_per_s", "train_tokens", "seconds")
# The few metrics `dvc metrics show` lists (metrics_headline.json; fnmatch patterns); metrics.json has all.
HEADLINE = ("heldout_loss", "violations_per_char", "zero_violation_frac", "seconds")

Objective = Literal["mle", "filter", "conditional", "unlikelihood", "rwr", "awr"]


@dataclass(frozen=True)
class Config(StageConfig):
    SECTION: ClassVar[str] = "pretrain"

    objective: Objective = field("conditional", "PHF objective: mle, filter, conditional, unlikelihood, rwr, awr")
    # Model and tokenizer
    tokenizer: str = field("", "Hugging Face tokenizer id or path; empty: train a byte-level BPE on train.jsonl")
    vocab_size: int = field(2048, "BPE vocabulary size when training the tokenizer (control tokens included)")
    init_model: str = field("", "Hugging Face model id or path to continue pretraining; empty: GPT-2 from scratch")
    n_embd: int = field(192, "GPT-2 width (from scratch)")
    n_layer: int = field(4, "GPT-2 layers (from scratch)")
    n_head: int = field(3, "GPT-2 attention heads (from scratch)")
    # Training budget
    seq_len: int = field(256, "tokens per training sequence (documents are packed, EOS-separated)")
    batch_size: int = field(16, "sequences per step and process")
    max_steps: int = field(300, "optimizer steps (the token budget is max_steps x batch_size x seq_len x gpus)")
    lr: float = field(2e-3, "peak AdamW learning rate")
    warmup_frac: float = field(0.01, "fraction of steps of linear warmup (PHF: 0.01), then linear decay to 0")
    weight_decay: float = field(0.1, "AdamW weight decay on matrices (PHF: 0.1)")
    grad_clip: float = field(1.0, "gradient norm clip")
    precision: Literal["auto", "bf16", "fp32"] = field("auto", "auto: bf16 autocast where the hardware has it")
    compile: bool = field(False, "torch.compile the model")
    threads: int = field(0, "CPU threads for torch (0: torch's default, one per core)")
    # Objective hyperparameters (PHF PEP8 configs: configs/pep8/*.yml of tomekkorbak/pretraining-with-human-feedback)
    threshold: float = field(0.0, "segment score (violations/char) at or below which a segment is aligned")
    filter_threshold: float = field(0.002361, "filter: drop documents whose violations/char exceed this")
    drop_token_prob: float = field(0.1, "conditional: probability of leaving a segment without a control token")
    ul_alpha: float = field(0.01, "unlikelihood: weight of the unlikelihood term on misaligned tokens")
    rwr_beta: float = field(10.0, "rwr: temperature of the reward weights exp(R / beta)")
    awr_alpha: float = field(0.05, "awr: weight of the LM term (1 - alpha weighs the value loss)")
    awr_beta: float = field(1.0, "awr: temperature of the advantage weights exp((R - V) / beta)")
    # Evaluation
    eval_prompts: int = field(512, "held-out prompts sampled for the oracle evaluation (>= 512 for the metrics)")
    eval_max_new_tokens: int = field(48, "token cap of a one-line completion")
    eval_val_chars: int = field(200_000, "characters of val.jsonl for the held-out loss (0: all)")
    # Run
    log_every: int = field(10, "steps between logged training metrics")
    save_every: int = field(100, "steps between checkpoints (one is always written at the end)")
    checkpoint_dir: str = field("checkpoints/pretrain", "checkpoints (outside the published output)")
    resume: bool = field(False, "resume from the latest checkpoint in checkpoint_dir")
    seed: int = field(0, "seed of initialisation, data order, token dropping and sampling")
    gpus: int = field(1, "processes to train with (the launcher runs torchrun/accelerate with this many)")

    def __post_init__(self):
        self.check(self.vocab_size >= 260, "vocab_size", "must be >= 260 (256 bytes and the special tokens)")
        for key in ("n_embd", "n_layer", "n_head", "seq_len", "batch_size", "max_steps", "eval_max_new_tokens",
                    "log_every", "save_every", "gpus"):
            self.check(getattr(self, key) >= 1, key, "must be >= 1")
        self.check(self.n_embd % self.n_head == 0, "n_embd", f"must be a multiple of n_head={self.n_head}")
        self.check(self.lr > 0, "lr", "must be > 0")
        self.check(0 <= self.warmup_frac < 1, "warmup_frac", "must be in [0, 1)")
        self.check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self.check(self.grad_clip > 0, "grad_clip", "must be > 0")
        self.check(self.threshold >= 0, "threshold", "must be >= 0")
        self.check(self.filter_threshold >= 0, "filter_threshold", "must be >= 0")
        self.check(0 <= self.drop_token_prob < 1, "drop_token_prob", "must be in [0, 1)")
        self.check(self.ul_alpha >= 0, "ul_alpha", "must be >= 0")
        self.check(self.rwr_beta > 0, "rwr_beta", "must be > 0")
        self.check(0 < self.awr_alpha <= 1, "awr_alpha", "must be in (0, 1]")
        self.check(self.awr_beta > 0, "awr_beta", "must be > 0")
        self.check(self.eval_prompts >= 1, "eval_prompts", "must be >= 1")
        self.check(self.eval_val_chars >= 0, "eval_val_chars", "must be >= 0")
        self.check(self.threads >= 0, "threads", "must be >= 0")


# Config keys that change the trained weights: a checkpoint only resumes a run that agrees on all of them.
TRAINING_KEYS = ("objective", "tokenizer", "vocab_size", "init_model", "n_embd", "n_layer", "n_head", "seq_len",
                 "batch_size", "max_steps", "lr", "warmup_frac", "weight_decay", "grad_clip", "precision",
                 "threshold", "filter_threshold", "drop_token_prob", "ul_alpha", "rwr_beta", "awr_alpha", "awr_beta",
                 "seed", "gpus")


def policy_meta(cfg: Config):
    """How the trained policy is prompted: conditional models end the prompt on <|aligned|> and never sample
    <|misaligned|>; the others never sample either control token."""
    from alignpipe.lm.models import ALIGNED, CONTROL_TOKENS, MISALIGNED
    from alignpipe.lm.policy import PolicyMeta

    extra = {"stage": "pretrain", "threshold": cfg.threshold, "segment": "line (control token before its newline)"}
    if cfg.objective == "conditional":
        return PolicyMeta(objective="conditional", prompt_suffix=ALIGNED, bad_words=(MISALIGNED,),
                          strip_tokens=CONTROL_TOKENS, extra=extra)
    return PolicyMeta(objective=cfg.objective, bad_words=CONTROL_TOKENS, strip_tokens=CONTROL_TOKENS, extra=extra)


def build_token_stream(rows: list[dict], tok, cfg: Config, seed: int):
    """The training token stream: documents (shuffled; filtered for `filter`) as EOS + segments, with a control
    token before each segment for `conditional`. Returns (ids, scores, stats): numpy arrays of token ids and of
    each token's segment score (violations/char), and counts."""
    import numpy as np

    from alignpipe.lm.models import control_ids
    from alignpipe.algos.phf import control_token, keep_document, split_segments

    rng = np.random.default_rng(seed)
    if cfg.objective == "filter":
        rows = [r for r in rows if keep_document(r["violations_per_char"], cfg.filter_threshold)]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    docs = [split_segments(r["text"], r["line_violations"]) for r in rows]
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


def _device_and_dtype(cfg: Config):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.precision == "fp32":
        return device, None
    if device == "cuda":
        has_bf16 = torch.cuda.is_bf16_supported()
    else:
        has_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if cfg.precision == "bf16" or has_bf16:
        return device, torch.bfloat16
    return device, None


def _lm_with_value(model, with_value: bool):
    """The trained module: the LM plus, for AWR, a linear value head on the last hidden state."""
    import torch

    class LMWithValue(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = model
            self.value = torch.nn.Linear(model.config.hidden_size, 1) if with_value else None

        def forward(self, input_ids):
            out = self.lm(input_ids=input_ids, output_hidden_states=self.value is not None, use_cache=False)
            values = self.value(out.hidden_states[-1]).squeeze(-1) if self.value is not None else None
            return out.logits, values

    return LMWithValue()


def _checkpoints(directory: Path) -> list[Path]:
    return sorted(directory.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def _fingerprint(cfg: Config) -> dict:
    return {k: getattr(cfg, k) for k in TRAINING_KEYS}


def heldout_loss(model, tok, texts: list[str], seq_len: int, batch_size: int = 16, dtype=None) -> dict[str, float]:
    """Nats per character of plain `texts` (each scored as EOS + text, in windows of `seq_len` that overlap by one
    token so every token is predicted once). Control-token logits are masked out: the result is the loss of a
    proper distribution over plain text (the policy sampled with both control tokens banned), comparable across
    objectives and tokenizations."""
    import contextlib

    import torch

    from alignpipe.lm.models import control_ids
    from alignpipe.algos.phf import nats_per_char

    device = next(model.parameters()).device
    ctrl = list(control_ids(tok))
    windows: list[list[int]] = []
    for text in texts:
        ids = [tok.eos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - 1, seq_len - 1):
            windows.append(ids[start:start + seq_len])
    total, n_tokens = 0.0, 0
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    model.eval()
    with torch.no_grad(), autocast:
        for b in range(0, len(windows), batch_size):
            batch = windows[b:b + batch_size]
            width = max(len(w) for w in batch)
            x = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.bool)
            for r, w in enumerate(batch):
                x[r, :len(w)] = torch.tensor(w)
                mask[r, :len(w)] = True
            x, mask = x.to(device), mask.to(device)
            logits = model(input_ids=x, attention_mask=mask.long(), use_cache=False).logits[:, :-1].float()
            logits[..., ctrl] = float("-inf")
            nll = -torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None])[..., 0]
            valid = mask[:, 1:]
            total += float(nll[valid].sum())
            n_tokens += int(valid.sum())
    chars = sum(len(t) for t in texts)
    return {"heldout_loss": nats_per_char(total, chars), "heldout_nats_per_token": total / max(n_tokens, 1),
            "heldout_chars_per_token": chars / max(n_tokens, 1)}


def _val_texts(data_dir: Path, max_chars: int) -> list[str]:
    from alignpipe.core.io import read_jsonl

    texts, total = [], 0
    for row in read_jsonl(data_dir / "val.jsonl"):
        if max_chars and total >= max_chars:
            break
        texts.append(row["text"])
        total += len(row["text"])
    return texts


def _check_rows(rows: list[dict], path: Path) -> None:
    from alignpipe.core.errors import DataError

    for i, row in enumerate(rows):
        for key, kind in (("text", str), ("line_violations", list), ("violations_per_char", (int, float))):
            if not isinstance(row.get(key), kind):
                what = getattr(kind, "__name__", "number")
                raise DataError(f"{path}:{i + 1}", f"field {key!r} missing or not a {what}")


def run(cfg: Config, inputs: dict[str, Path | None], out_dir: Path) -> dict[str, float]:
    """Train, evaluate and save the policy (safetensors + tokenizer + alignpipe.json) into `out_dir`."""
    import os
    import shutil
    import sys
    import time

    import numpy as np
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from alignpipe.tracking import runs
    from alignpipe.core import distributed
    from alignpipe.core.errors import ConfigError
    from alignpipe.oracle.policy_eval import evaluate_policy, load_prompts
    from alignpipe.core.io import read_json, read_jsonl, write_json, write_jsonl
    from alignpipe.lm.models import build_model, load_tokenizer, train_tokenizer, training_flops_per_token
    from alignpipe.algos.phf import token_loss
    from alignpipe.lm.policy import Sampling, save_policy

    data_dir = Path(inputs["data"])
    world, rank = distributed.world_size(), distributed.process_rank()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    main = rank == 0
    device, dtype = _device_and_dtype(cfg)
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    ckpt_dir = Path(cfg.checkpoint_dir)
    existing = _checkpoints(ckpt_dir) if cfg.resume else []
    if cfg.resume and not existing and main:
        print(f"pretrain: no checkpoint in {ckpt_dir}; starting from step 0", file=sys.stderr)
    if main and not cfg.resume:
        for old in _checkpoints(ckpt_dir):
            shutil.rmtree(old)
        shutil.rmtree(ckpt_dir / "tokenizer", ignore_errors=True)

    rows = read_jsonl(data_dir / "train.jsonl")
    _check_rows(rows, data_dir / "train.jsonl")
    if existing:
        tok = load_tokenizer(str(ckpt_dir / "tokenizer"))
    elif cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    else:
        tok = train_tokenizer((r["text"] for r in rows), cfg.vocab_size)
    if main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(ckpt_dir / "tokenizer"))

    ids, scores, stats = build_token_stream(rows, tok, cfg, cfg.seed)
    n_blocks = len(ids) // cfg.seq_len
    if n_blocks < cfg.batch_size * world:
        raise ConfigError("pretrain.batch_size", f"the corpus has only {n_blocks} sequences of {cfg.seq_len} tokens")
    blocks = torch.from_numpy(ids[:n_blocks * cfg.seq_len].reshape(n_blocks, cfg.seq_len))
    block_scores = torch.from_numpy(scores[:n_blocks * cfg.seq_len].reshape(n_blocks, cfg.seq_len))
    global_batch = cfg.batch_size * world
    epochs = -(-cfg.max_steps * global_batch // n_blocks)
    order_rng = np.random.default_rng(cfg.seed + 1)
    order = np.concatenate([order_rng.permutation(n_blocks) for _ in range(epochs)])

    lm = build_model(tok, cfg.n_embd, cfg.n_layer, cfg.n_head, max(cfg.seq_len, 256), cfg.init_model)
    net = _lm_with_value(lm, cfg.objective == "awr").to(device)
    decay = [p for p in net.parameters() if p.dim() >= 2]
    no_decay = [p for p in net.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), fused=True)
    warmup = max(int(cfg.warmup_frac * cfg.max_steps), 1)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (cfg.max_steps - step) / max(cfg.max_steps - warmup, 1))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    start_step = 0
    if existing:
        state = torch.load(existing[-1] / "state.pt", map_location=device, weights_only=True)
        saved = read_json(existing[-1] / "fingerprint.json")
        diff = [k for k in TRAINING_KEYS if saved.get(k) != _fingerprint(cfg).get(k) and k != "max_steps"]
        if diff:
            raise ConfigError(f"pretrain.{diff[0]}", f"differs from the checkpoint in {existing[-1]} "
                              f"({saved.get(diff[0])!r}); resume with the same config or drop --resume")
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_step = int(state["step"])
    train_net = net
    if world > 1:
        train_net = torch.nn.parallel.DistributedDataParallel(net)
    forward = torch.compile(train_net) if cfg.compile else train_net

    def save_checkpoint(step: int) -> None:
        if not main:
            return
        path = ckpt_dir / f"step-{step:07d}"
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "step": step}, tmp / "state.pt")
        write_json(tmp / "fingerprint.json", _fingerprint(cfg))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        for old in _checkpoints(ckpt_dir)[:-2]:
            shutil.rmtree(old)

    hp = {k: getattr(cfg, k) for k in ("threshold", "ul_alpha", "rwr_beta", "awr_alpha", "awr_beta")}
    autocast = (lambda: torch.autocast(device.split(":")[0], dtype=dtype)) if dtype is not None else None
    net.train()
    tokens_per_step = global_batch * cfg.seq_len
    t_start = time.perf_counter()
    t_log, last_logged = t_start, start_step
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="pretrain",
               unit="step", disable=not main, mininterval=5)
    loss_value = float("nan")
    for step in bar:
        idx = order[step * global_batch + rank * cfg.batch_size: step * global_batch + (rank + 1) * cfg.batch_size]
        x = blocks[idx].to(device)
        s = block_scores[idx].to(device)
        if autocast is not None:
            with autocast():
                logits, values = forward(x)
        else:
            logits, values = forward(x)
        loss, logs = token_loss(cfg.objective, logits[:, :-1], x[:, 1:], s[:, 1:],
                                None if values is None else values[:, :-1], **hp)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        log_step = done % cfg.log_every == 0 or done == cfg.max_steps
        if log_step and world > 1:  # every rank joins: log the global batch's loss, as one process would
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        if main and log_step:
            loss_value = float(loss.detach())
            now = time.perf_counter()
            tps = (done - last_logged) * tokens_per_step / max(now - t_log, 1e-9)
            t_log, last_logged = now, done
            runs.log_metrics({"train/loss": loss_value, "train/learning_rate": sched.get_last_lr()[0],
                                  "train/tokens_per_s": tps, "train/grad_norm": float(grad_norm),
                                  **{f"train/{k}": float(v) for k, v in logs.items()}}, step=done)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tps:.0f}")
        if done % cfg.save_every == 0 or done == cfg.max_steps:
            save_checkpoint(done)
    bar.close()
    train_seconds = time.perf_counter() - t_start
    trained_tokens = (cfg.max_steps - start_step) * tokens_per_step
    if start_step == cfg.max_steps:
        save_checkpoint(cfg.max_steps)

    metrics: dict[str, float] = {}
    if main:
        lm.eval()
        meta = policy_meta(cfg)
        metrics.update(heldout_loss(lm, tok, _val_texts(data_dir, cfg.eval_val_chars), cfg.seq_len, dtype=dtype))
        prompts = load_prompts(data_dir, cfg.eval_prompts)
        sampling = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=cfg.eval_max_new_tokens,
                            max_prompt_tokens=min(192, lm.config.max_position_embeddings - cfg.eval_max_new_tokens))
        with (autocast() if autocast is not None else torch.no_grad()):
            oracle, details = evaluate_policy((lm, tok, meta), prompts, sampling, seed=cfg.seed,
                                              progress="pretrain: sampling")
        metrics.update(oracle)
        write_jsonl(out_dir / "samples.jsonl", (
            {"source": p.get("source", ""), "prompt": p["prompt"], "completion": c, "violations_per_char": v}
            for p, c, v in zip(prompts, details["completions"], details["scores"])))
        save_policy(lm, tok, meta, out_dir)
        params = sum(p.numel() for p in lm.parameters())
        tokens_per_s = trained_tokens / train_seconds if trained_tokens else 0.0
        metrics.update({
            "tokens_per_s": tokens_per_s,
            "train_tokens": cfg.max_steps * tokens_per_step,
            "train_seconds": train_seconds,
            "train_tflops": training_flops_per_token(lm, cfg.seq_len) * tokens_per_s / 1e12,
            "final_train_loss": loss_value,
            "params": params,
            "resumed_from_step": start_step,
            **stats,
        })
        metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and v != v)}
    if world > 1:
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics
