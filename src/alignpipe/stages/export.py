"""Export the best policy and the reward model to ONNX, check them against PyTorch, time them, log them to MLflow.

The policy becomes a KV-cache decoder (`policy.onnx`), the reward model a scorer (`reward.onnx`); see
`alignpipe.lm.onnx_runtime`. The stage fails, writing nothing, unless the ONNX logits and rewards match PyTorch within
`parity_atol` on held-out prompts and greedy generation matches `generate()` token for token. Both models are
logged to the stage's MLflow run with the onnx flavor; `alignpipe.tracking.policies.register_onnx` (called by the
register stage) turns them into `alignpipe-policy-onnx` / `alignpipe-reward-onnx` versions tagged with the PyTorch
versions they came from.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from alignpipe.core.config import MAX_REPEATS, MAX_ROWS, MAX_SEED, MAX_THREADS, MAX_TOKENS, StageConfig, field
from alignpipe.core.errors import AlignpipeError, ConfigError, DataError
from alignpipe.core.io import iter_jsonl, write_json
from alignpipe.tasks import task_of
from alignpipe.lm.batching import pad
from alignpipe.reports.candidates import best_candidate
from alignpipe.stages import Input
from alignpipe.tracking import runs

# Used when data/prompts.jsonl is absent: code openings like the held-out prompts of the PEP8 task.
FALLBACK_PROMPTS = ("import os\n", "def main(", "class Config:\n    ", "for i in range(",
                    "if __name__ == '__main__':\n", "def add(a, b):\n    ", "x = [", "with open(path) as f:\n")


@dataclass(frozen=True)
class Config(StageConfig):
    """Settings of `alignpipe export`."""

    SECTION: ClassVar[str] = "export"

    quantize: bool = field(False, "also write int8 dynamically quantized copies (*.int8.onnx) and report them")
    parity_atol: float = field(1e-3, "max abs difference allowed between ONNX and PyTorch logits and rewards", ge=0)
    n_parity_prompts: int = field(8, "held-out prompts for the parity and latency checks", ge=1, le=MAX_ROWS)
    max_new_tokens: int = field(32, "tokens generated per prompt in the greedy parity and latency checks",
                                ge=1, le=MAX_TOKENS)
    opset: int = field(18, "ONNX opset (the torch.export-based exporter needs >= 18)", ge=18)
    providers: Literal["auto", "cpu", "cuda"] = field("auto", "onnxruntime providers: auto = CUDA if usable, else CPU")
    intra_op_threads: int = field(0, "onnxruntime intra-op threads (0 = onnxruntime's default)", ge=0, le=MAX_THREADS)
    latency_repeats: int = field(3, "timed repeats per latency figure (the median is reported)", ge=1, le=MAX_REPEATS)
    seed: int = field(0, "random seed (prompt sampling)", ge=0, le=MAX_SEED)


INPUTS = (
    Input("best", "artifacts/evaluate/best", "the policy to export: evaluate's best/ (its candidate.json names it) "
          "or any policy directory"),
    Input("reward_model", "artifacts/reward", "reward model (save_pretrained directory)"),
    Input("data", "data", "data directory; held-out prompts from prompts.jsonl (fixed prompts if absent)",
          required=False),
)

METRICS = ("max_abs_diff_policy", "max_abs_diff_reward", "greedy_match_frac", "ort_speedup_reward",
           "ort_speedup_generate")
# The few metrics `dvc metrics show` lists (metrics_headline.json; fnmatch patterns); metrics.json has all.
HEADLINE = ("max_abs_diff_policy", "greedy_match_frac", "ort_speedup_generate")


class ParityError(AlignpipeError):
    """The exported graphs do not reproduce PyTorch."""

    def __init__(self, reason: str):
        super().__init__("export parity", reason, exit_code=1)


def run(cfg: Config, inputs: dict[str, Path | None], out_dir: Path) -> dict[str, float]:
    """Export, check parity (raising ParityError), time, optionally quantize, and log the ONNX models."""
    import torch

    from alignpipe.lm import onnx_runtime as ox

    torch.manual_seed(cfg.seed)
    try:
        providers = ox.choose_providers(cfg.providers)
    except ValueError as e:
        raise ConfigError("export.providers", f"{cfg.providers!r}: {e}") from None
    candidate, policy_dir = best_candidate(inputs["best"])[0], inputs["best"]
    policy, tok, meta, reward, reward_tok = _load_models(policy_dir, inputs["reward_model"])
    prompts = held_out_prompts(inputs.get("data"), cfg.n_parity_prompts, cfg.seed)
    ids, mask, gen_kw = _prompt_batch(cfg, policy, tok, meta, prompts, task_of(inputs.get("data")))

    for name, model, source, export in (("policy", policy, policy_dir, ox.export_policy),
                                        ("reward", reward, inputs["reward_model"], ox.export_reward)):
        try:
            export(model, out_dir / f"{name}.onnx", cfg.opset)
        except Exception as e:  # torch.export/onnx raise many types; one line naming the model is what helps
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise DataError(str(source), f"ONNX export of this {model.config.model_type} model failed "
                            f"(torch {torch.__version__}): {type(e).__name__}: {first}") from e
    ort_policy, ort_reward = _sessions(cfg, out_dir, "", providers)
    providers = ort_policy.session.get_providers()  # what runs: onnxruntime may have fallen back to the CPU
    if providers[0] == ox.CUDA:  # time PyTorch on the same device
        policy, reward = policy.to("cuda"), reward.to("cuda")
    ref = _reference(policy, tok, reward, reward_tok, prompts, ids, mask, gen_kw)
    fp32 = _compare(ref, ort_policy, ort_reward)
    _check_parity(cfg.parity_atol, fp32, ref, tok)

    timings = ox.median_seconds(cfg.latency_repeats, {
        "reward_torch": lambda: ox.torch_rewards(reward, ref.r_ids, ref.r_mask),
        "reward_ort": lambda: ort_reward.score(ref.r_ids, ref.r_mask),
        "generate_torch": lambda: ox.torch_generate(policy, ref.ids, ref.mask, **ref.gen_kw),
        "generate_ort": lambda: ort_policy.generate(ref.ids, ref.mask, **ref.gen_kw),
    })
    metrics = {
        "max_abs_diff_policy": fp32["max_abs_diff_policy"], "max_abs_diff_reward": fp32["max_abs_diff_reward"],
        "greedy_match_frac": fp32["greedy_match_frac"],
        "ort_speedup_reward": timings["reward_torch"] / timings["reward_ort"],
        "ort_speedup_generate": timings["generate_torch"] / timings["generate_ort"],
        "reward_ms_torch": 1e3 * timings["reward_torch"], "reward_ms_ort": 1e3 * timings["reward_ort"],
        "generate_tokens_per_s_torch": ref.new_tokens / timings["generate_torch"],
        "generate_tokens_per_s_ort": ref.new_tokens / timings["generate_ort"],
        "n_parity_prompts": len(prompts),
    }
    models = {"policy": ("policy.onnx", "fp32"), "reward": ("reward.onnx", "fp32")}
    if cfg.quantize:
        quantized = _quantized_report(cfg, out_dir, providers, ref, timings)
        write_json(out_dir / "quantized_report.json", quantized)
        metrics.update({f"int8_{k}": v for k, v in quantized["metrics"].items()})
        models.update({"policy_int8": ("policy.int8.onnx", "int8"), "reward_int8": ("reward.int8.onnx", "int8")})
    write_json(out_dir / "report.json", {
        "candidate": candidate, "policy_dir": str(policy_dir), "reward_dir": str(inputs["reward_model"]),
        "providers": ort_policy.session.get_providers(), "graph_optimization_level": "ORT_ENABLE_ALL",
        "opset": cfg.opset, "prompt_template": meta.format_prompt("{prompt}"),
        "bad_token_ids": ref.gen_kw["bad_token_ids"],
        "parity": {"atol": cfg.parity_atol, **{k: v for k, v in fp32.items() if k not in ("seqs", "matches")},
                   "prompts": [{"prompt": p, "completion": c, "greedy_equal": m}
                               for p, c, m in zip(prompts, ref.completions, fp32["matches"])]},
        "latency": {"batch": len(prompts), "max_new_tokens": cfg.max_new_tokens, "new_tokens": ref.new_tokens,
                    "reward_seq_len": int(ref.r_ids.shape[1]), "repeats": cfg.latency_repeats,
                    "seconds_median": timings,
                    **{k: v for k, v in metrics.items() if k.startswith(("reward_ms", "generate_", "ort_"))}},
        "files": {p.name: p.stat().st_size for p in sorted(out_dir.glob("*.onnx"))},
    })

    tok.save_pretrained(out_dir / "policy_tokenizer")
    meta.save(out_dir / "policy_tokenizer")
    reward_tok.save_pretrained(out_dir / "reward_tokenizer")
    logged = _log_onnx_models(out_dir, models, providers, {"candidate": candidate, "source_dir": str(policy_dir)},
                              {"source_dir": str(inputs["reward_model"])})
    write_json(out_dir / "onnx_models.json", {
        "run_id": logged["run_id"], "candidate": candidate, "policy_dir": str(policy_dir),
        "reward_dir": str(inputs["reward_model"]), "models": logged["models"],
        "parity": {k: metrics[k] for k in ("max_abs_diff_policy", "max_abs_diff_reward", "greedy_match_frac")},
    })
    return metrics


@dataclass
class _Reference:
    """The held-out inputs and PyTorch's outputs on them, which the ONNX graphs must reproduce."""

    ids: np.ndarray  # left-padded formatted prompts (batch, prompt_len)
    mask: np.ndarray
    gen_kw: dict[str, Any]  # generation settings shared by generate() and the ONNX loop
    seqs: np.ndarray  # PyTorch greedy: prompt + new tokens
    full_mask: np.ndarray  # attention mask of `seqs` (generate() attends to every new position)
    logits: np.ndarray  # PyTorch logits along `seqs`
    completions: list[str]
    r_ids: np.ndarray  # right-padded reward inputs: prompt + completion
    r_mask: np.ndarray
    rewards: np.ndarray  # PyTorch rewards
    new_tokens: int  # generated tokens, padding excluded


def _prompt_batch(cfg: Config, policy, tok, meta, prompts: list, task):
    """Left-padded formatted prompts (as `alignpipe.lm.policy` formats them; chat: the chat template with the
    generation prompt, as `alignpipe.oracle.chat_eval.sample_chat`) and the generation settings (chat: greedy
    answers stop at the end-of-turn token)."""
    from alignpipe.lm.policy import banned_token_ids, encode_prompts

    from alignpipe.lm.models import context_length

    positions = context_length(policy)
    max_prompt = positions - cfg.max_new_tokens
    if max_prompt < 1:
        raise ConfigError("export.max_new_tokens", f"must be < the policy's {positions} positions, "
                          f"got {cfg.max_new_tokens}")
    encoded = encode_prompts(tok, meta, prompts, max_prompt, task)
    if not all(encoded):
        raise DataError(f"held-out prompt {encoded.index([])}", "tokenizes to nothing")
    ids, mask = pad(encoded, tok.pad_token_id, "left")
    stops = task.stop_token_ids(tok)
    eos = stops[-1] if stops else None  # the task's last stop token: chat's end-of-turn token when it has one
    gen_kw = dict(max_new_tokens=cfg.max_new_tokens, eos_token_id=eos,
                  pad_token_id=tok.pad_token_id, bad_token_ids=banned_token_ids(tok, meta))
    return ids, mask, gen_kw


def _reference(policy, tok, reward, reward_tok, prompts, ids, mask, gen_kw) -> _Reference:
    from alignpipe.lm import onnx_runtime as ox

    seqs = ox.torch_generate(policy, ids, mask, **gen_kw)
    full_mask = np.concatenate([mask, np.ones((len(ids), seqs.shape[1] - ids.shape[1]), mask.dtype)], axis=1)
    completions = tok.batch_decode(seqs[:, ids.shape[1]:], skip_special_tokens=True)
    from alignpipe.lm.models import context_length

    r_ids, r_mask = _encode_reward(reward_tok, reward.config.pad_token_id, prompts, completions,
                                   context_length(reward))
    return _Reference(ids, mask, gen_kw, seqs, full_mask, ox.torch_logits(policy, seqs, full_mask), completions,
                      r_ids, r_mask, ox.torch_rewards(reward, r_ids, r_mask),
                      int((seqs[:, ids.shape[1]:] != tok.pad_token_id).sum()))


def _sessions(cfg: Config, out_dir: Path, suffix: str, providers: list[str]):
    """One OrtPolicy and one OrtReward session on policy{suffix}.onnx / reward{suffix}.onnx, reused throughout.
    With providers=auto a provider that fails to load falls back to the CPU; an explicit choice must load."""
    from alignpipe.lm import onnx_runtime as ox

    strict = cfg.providers != "auto"
    return tuple(cls(ox.open_session(out_dir / f"{name}{suffix}.onnx", providers, cfg.intra_op_threads, strict))
                 for cls, name in ((ox.OrtPolicy, "policy"), (ox.OrtReward, "reward")))


def _compare(ref: _Reference, ort_policy, ort_reward) -> dict[str, Any]:
    """ONNX vs PyTorch: logits along PyTorch's greedy sequences (the prompt in one call, then one token per call
    through the cache), rewards, and greedy generation row by row."""
    seqs = ort_policy.generate(ref.ids, ref.mask, **ref.gen_kw)
    logits = ort_policy.logits(ref.seqs, ref.full_mask, prefill=ref.ids.shape[1])
    matches = _rows_equal(ref.seqs, seqs, ref.gen_kw["pad_token_id"])
    return {"max_abs_diff_policy": float(np.abs(logits - ref.logits)[ref.full_mask.astype(bool)].max()),
            "max_abs_diff_reward": float(np.abs(ort_reward.score(ref.r_ids, ref.r_mask) - ref.rewards).max()),
            "greedy_match_frac": float(np.mean(matches)), "matches": matches, "seqs": seqs}


def held_out_prompts(data_dir: Path | None, n: int, seed: int) -> list:
    """`n` prompts sampled with `seed` from `<data>/prompts.jsonl` (all when fewer), else the fixed prompts; a
    prompt is a string, or a list of messages (chat)."""
    from alignpipe.core.io import is_messages

    path = data_dir / "prompts.jsonl" if data_dir is not None else None
    if path is None or not path.is_file():
        return list(FALLBACK_PROMPTS[:n])
    prompts = []
    for i, row in enumerate(iter_jsonl(path), start=1):
        if not (isinstance(row.get("prompt"), str) and row["prompt"]) and not is_messages(row.get("prompt")):
            raise DataError(f"{path}: row {i}", "expected a field 'prompt': a non-empty string or a list of messages")
        prompts.append(row["prompt"])
    if len(prompts) > n:
        prompts = [prompts[i] for i in sorted(random.Random(seed).sample(range(len(prompts)), n))]
    return prompts


def _load_models(policy_dir: Path, reward_dir: Path):
    """(policy, tokenizer, PolicyMeta, reward model, reward tokenizer), fp32 on the CPU (where they are exported),
    via the shared loaders."""
    from alignpipe.lm.policy import load_policy
    from alignpipe.lm.reward_model import load_reward_model

    policy, tok, meta = load_policy(policy_dir, device="cpu")
    reward, reward_tok = load_reward_model(reward_dir, device="cpu")
    if tok.pad_token_id is None:
        raise DataError(str(policy_dir), "tokenizer has no pad token")
    return policy.float(), tok, meta, reward.float(), reward_tok


def _encode_reward(tok, pad_id: int, prompts: list[str], completions: list[str],
                   max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded reward inputs, formatted as `alignpipe.lm.reward_model` formats them (the last `max_len` tokens)."""
    from alignpipe.lm.reward_model import reward_ids

    rows = [reward_ids(p, c, tok)[-max_len:] for p, c in zip(prompts, completions)]
    return pad(rows, pad_id, "right")


def _rows_equal(a: np.ndarray, b: np.ndarray, pad_id: int) -> list[bool]:
    """Row-wise equality of two generations that may have stopped at different lengths."""
    width = max(a.shape[1], b.shape[1])
    a = np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=pad_id)
    b = np.pad(b, ((0, 0), (0, width - b.shape[1])), constant_values=pad_id)
    return [bool(x) for x in (a == b).all(axis=1)]


def _check_parity(atol: float, result: dict[str, Any], ref: _Reference, tok) -> None:
    """Raise ParityError naming every check that failed (for greedy: the first diverging token)."""
    problems = [f"{name} differ from PyTorch by {result[key]:.3g} > parity_atol {atol:g}"
                for name, key in (("policy logits", "max_abs_diff_policy"), ("rewards", "max_abs_diff_reward"))
                if result[key] > atol]
    matches, seqs = result["matches"], result["seqs"]
    if not all(matches):
        row = matches.index(False)
        width = min(ref.seqs.shape[1], seqs.shape[1])
        step = int(np.argmax(ref.seqs[row, :width] != seqs[row, :width]))
        want, got = int(ref.seqs[row, step]), int(seqs[row, step])
        gap = float(ref.logits[row, step - 1, want] - ref.logits[row, step - 1, got])
        problems.append(f"greedy generation differs on {matches.count(False)}/{len(matches)} prompts (first: "
                        f"prompt {row}, new token {step - ref.ids.shape[1]}: PyTorch {tok.decode([want])!r}, "
                        f"ONNX {tok.decode([got])!r}, PyTorch logit gap between them {gap:.3g})")
    if problems:
        raise ParityError("; ".join(problems))


def _quantized_report(cfg: Config, out_dir: Path, providers: list[str], ref: _Reference,
                      timings: dict[str, float]) -> dict[str, Any]:
    """int8 copies of both graphs, measured against fp32: reward pair accuracy (the share of pairs of held-out
    texts that int8 orders as fp32 PyTorch does), greedy-match rate against fp32 (PyTorch's greedy output, which
    the fp32 graph reproduces), max abs differences, and speed against PyTorch eager."""
    from alignpipe.lm import onnx_runtime as ox

    for name in ("policy", "reward"):
        ox.quantize_int8(out_dir / f"{name}.onnx", out_dir / f"{name}.int8.onnx")
    policy, reward = _sessions(cfg, out_dir, ".int8", providers)
    result = _compare(ref, policy, reward)
    rewards = reward.score(ref.r_ids, ref.r_mask)
    pairs = [(i, j) for i in range(len(rewards)) for j in range(i + 1, len(rewards))
             if ref.rewards[i] != ref.rewards[j]]
    same_order = [(rewards[i] - rewards[j]) * (ref.rewards[i] - ref.rewards[j]) > 0 for i, j in pairs]
    int8_times = ox.median_seconds(cfg.latency_repeats, {
        "reward_ort": lambda: reward.score(ref.r_ids, ref.r_mask),
        "generate_ort": lambda: policy.generate(ref.ids, ref.mask, **ref.gen_kw),
    })
    new_tokens = int((result["seqs"][:, ref.ids.shape[1]:] != ref.gen_kw["pad_token_id"]).sum())
    metrics = {
        "reward_pair_accuracy": float(np.mean(same_order)) if pairs else 1.0,
        "greedy_match_frac": result["greedy_match_frac"],
        "max_abs_diff_policy": result["max_abs_diff_policy"],
        "max_abs_diff_reward": result["max_abs_diff_reward"],
        "ort_speedup_reward": timings["reward_torch"] / int8_times["reward_ort"],
        "ort_speedup_generate": (new_tokens / int8_times["generate_ort"])
        / (ref.new_tokens / timings["generate_torch"]),
    }
    return {"method": "onnxruntime.quantization.quantize_dynamic, QInt8 weights", "n_reward_pairs": len(pairs),
            "metrics": metrics, "greedy_equal": result["matches"], "seconds_median": int8_times,
            "files": {f"{n}.int8.onnx": (out_dir / f"{n}.int8.onnx").stat().st_size for n in ("policy", "reward")}}


def _log_onnx_models(out_dir: Path, models: dict[str, tuple[str, str]], providers: list[str],
                     policy_meta: dict[str, str], reward_meta: dict[str, str]) -> dict[str, Any]:
    """Log each ONNX file to the active MLflow run with the onnx flavor; outside a run (a direct call of `run`)
    nothing is logged and the model URIs are null, as `runs.log_metrics` does."""
    from alignpipe.lm import onnx_runtime as ox
    from alignpipe.tracking.policies import log_onnx_model

    run_id = runs.active_run_id()
    out: dict[str, Any] = {"run_id": run_id, "models": {}}
    for key, (filename, precision) in models.items():
        path = out_dir / filename
        is_policy = key.startswith("policy")
        entry = {"file": filename, "precision": precision, "sha256": _sha256(path), "artifact_path": f"{key}_onnx",
                 "model_uri": None, "model_id": None}
        if run_id is not None:
            tokenizer_dir = out_dir / ("policy_tokenizer" if is_policy else "reward_tokenizer")
            entry.update(log_onnx_model(
                path, entry["artifact_path"], ox.io_signature(ox.open_session(path, [ox.CPU])), providers,
                metadata={**(policy_meta if is_policy else reward_meta), "precision": precision},
                extra_files=[str(p) for p in sorted(tokenizer_dir.iterdir())]))
        out["models"][key] = entry
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
