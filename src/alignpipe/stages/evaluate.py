"""Evaluate every candidate policy on the same held-out prompts, sampling settings and seed.

Candidates: the policy-producing stages of the registry (`alignpipe.stages.CANDIDATES`): the pretrained policy
(`--policy`, also the reference) and every other one whose directory is given explicitly (one input each, named
after its output, without a default: dvc.yaml and the DAG pass them all; a folder merely present is not picked up), plus any extra policy directories in `evaluate.extra_candidates` (e.g. the MLE baseline). Per candidate: the
oracle's violations/char (lower is better) and zero-violation fraction, the reward model's mean score, the
sampled KL to the reference, held-out perplexity on unconditioned validation text, and the win rate against the
reference and against the registered `champion` (when one exists, loaded from the MLflow registry).
The sampling and comparison are `alignpipe.oracle.policy_eval`; this stage runs it per candidate. The report files
(Markdown, plots, frontier, samples, HTML page) are rendered by `alignpipe.reports`.
The best candidate on the gate metric is copied to best/ with candidate.json (its report entry; export and register
read only that). Also writes report.json, report.md, samples.jsonl, report.html (the report and plots as one
self-contained page), frontier.tsv (the score-vs-KL frontier for `dvc plots`) and two PNG plots.

`greedy` decodes every candidate and the champion greedily (as the served model answers at temperature 0).

The chat task (`data.task: chat`, from the data's MANIFEST.json) has no oracle: `run_chat` samples each candidate's
and the registered champion's answers through the chat template (`alignpipe.oracle.chat_eval`) and reports the
reward model's mean score, the judge's win rates against the reference and the champion (the gate metric is the win
rate against the reference, higher is better; the judge is `evaluate.judge_model`, a second reward model, or the
reward model itself), the sampled KL and held-out perplexity, and, with a distinct judge, the reward-hacking guard.
The champion's row is measured on the same conversations and seed, so register's gate compares like with like. It
writes report.json, report.md, report.html and samples.jsonl.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from alignpipe.core.config import (ALIAS, MAX_CHARS, MAX_ROWS, MAX_SEED, MAX_TOKENS, MODEL_NAME,
                                   StageConfig, field)
from alignpipe.lm.policy import Sampling
from alignpipe.stages import CANDIDATES, REFERENCE, Input

INPUTS = (
    Input("data", "data", "dataset directory (val.jsonl for perplexity, prompts.jsonl)"),
    Input(CANDIDATES[0][1], f"artifacts/{REFERENCE}", f"{REFERENCE} policy: the reference and a candidate"),
    *(Input(output, None, f"{stage} policy (a candidate when given)", False, pipeline_path=f"artifacts/{stage}")
      for stage, output in CANDIDATES[1:]),
    Input("reward_model", "artifacts/reward", "reward model (reward_score when present)", False),
    Input("prompts", None, "held-out prompts JSONL with 'prompt' (default: <data>/prompts.jsonl)", False),
)
METRICS = ("best_candidate_index", "n_candidates")
# The few metrics `dvc metrics show` lists (metrics_headline.json; fnmatch patterns); metrics.json has all.
HEADLINE = ("best_candidate_index", "*/violations_per_char", "*/win_rate_vs_ref", "*/judge_win_rate_vs_ref")

@dataclass(frozen=True)
class Config(StageConfig):
    SECTION: ClassVar[str] = "evaluate"
    RENAMED: ClassVar[dict[str, str]] = {k: f"sampling.{k}" for k in ("temperature", "top_p", "max_new_tokens",
                                                                       "batch_size")}

    n_prompts: int = field(256, "held-out prompts to evaluate on (0 = all of them)", ge=0, le=MAX_ROWS)
    sampling: Sampling = field(Sampling(), "how every candidate and the champion are sampled (the same for all)")
    seed: int = field(0, "sampling and bootstrap seed, the same for every candidate", ge=0, le=MAX_SEED)
    extra_candidates: list[str] = field([], "more policy dirs to evaluate, as NAME=PATH (e.g. mle=artifacts/mle)",
                                        pattern=(r"[^/=]*[^/=\s][^/=]*=.*\S.*", "NAME=PATH"))
    ppl_max_chars: int = field(50000, "characters of data/val.jsonl text used for held-out perplexity",
                               ge=1, le=MAX_CHARS)
    ppl_window: int = field(256, "tokens per perplexity window (at most the model's context)", ge=2, le=MAX_TOKENS)
    champion_model: str = field("alignpipe-policy", "registered model whose champion is compared against",
                                pattern=MODEL_NAME)
    champion_alias: str = field("champion", "alias of the registered champion (no comparison when absent)",
                                pattern=ALIAS)
    compare_champion: bool = field(True, "load the registered champion and report win rates against it")
    greedy: bool = field(False, "decode greedily (sampling.temperature and top_p unused), as the served model "
                         "answers at temperature 0")
    judge_model: str = field("", "chat task: a reward model directory that judges candidates against the reference "
                             "(distinct from the optimised reward model: the reward-hacking guard's score); empty: "
                             "the reward model judges and the guard is not run")


def candidate_dirs(inputs: dict[str, Path | None], cfg: Config) -> dict[str, Path]:
    """Candidate (stage) name -> policy directory, in registry order (the reference first); the candidates whose
    input is absent (e.g. a stage switched off) are skipped; then `extra_candidates`."""
    from alignpipe.core.errors import ConfigError

    out = {stage: Path(inputs[output]) for stage, output in CANDIDATES if inputs.get(output) is not None}
    for item in cfg.extra_candidates:
        name, _, path = (s.strip() for s in item.partition("="))
        if name in out:
            raise ConfigError("evaluate.extra_candidates", f"candidate name {name!r} is already used")
        if not Path(path).is_dir():
            raise ConfigError("evaluate.extra_candidates", f"{path}: policy directory not found")
        out[name] = Path(path)
    return out


def heldout_text(data_dir: Path, max_chars: int) -> list[str]:
    """The first `max_chars` characters of data/val.jsonl's texts (whole texts, the last one cut)."""
    from alignpipe.core.errors import DataError
    from alignpipe.core.io import read_jsonl

    path = data_dir / "val.jsonl"
    texts, total = [], 0
    for i, row in enumerate(read_jsonl(path)):
        if not isinstance(row.get("text"), str):
            raise DataError(f"{path}:{i + 1}", "field 'text' must be a string")
        take = row["text"][:max_chars - total]
        if take:
            texts.append(take)
            total += len(take)
        if total >= max_chars:
            break
    return texts


def run(cfg: Config, inputs: dict[str, Path | None], out_dir: Path) -> dict[str, float]:
    """Evaluate every candidate on the same prompts and seed; write the report, samples, frontier and plots."""
    import torch

    from alignpipe.core.hashing import prompts_sha256, weights_sha256
    from alignpipe.lm.heldout import heldout_nll
    from alignpipe.lm.models import context_length
    from alignpipe.lm.policy import load_policy
    from alignpipe.oracle.policy_eval import draw, evaluate_candidate, load_prompts
    from alignpipe.reports.candidates import write_best
    from alignpipe.reports.evaluation import write_outputs
    from alignpipe.tasks import task_of

    task = task_of(inputs["data"])
    if task.oracle() is None:  # no oracle: the reward model and a judge score the candidates
        return run_chat(cfg, inputs, out_dir, task)
    torch.manual_seed(cfg.seed)
    prompts_path = inputs.get("prompts") or Path(inputs["data"]) / "prompts.jsonl"
    rows = load_prompts(prompts_path, limit=cfg.n_prompts or None)
    sampling = cfg.sampling
    val_texts = heldout_text(Path(inputs["data"]), cfg.ppl_max_chars)
    val_chars = sum(len(t) for t in val_texts)
    dirs = candidate_dirs(inputs, cfg)
    reward = None
    if inputs.get("reward_model") is not None:
        from alignpipe.lm.reward_model import load_reward_model

        reward = load_reward_model(inputs["reward_model"])

    ref = load_policy(dirs[REFERENCE])
    ref_draw = draw(ref, rows, sampling, cfg.seed, f"evaluate {REFERENCE}", task=task, greedy=cfg.greedy)
    champion, champion_draw = (_draw_champion(cfg, rows, sampling, reward, task) if cfg.compare_champion
                               else (None, None))

    results: dict[str, dict[str, Any]] = {}
    draws = {}
    for name, path in dirs.items():
        policy = ref if name == REFERENCE else load_policy(path)
        metrics, draws[name] = evaluate_candidate(policy, rows, sampling, cfg.seed, ref, ref_draw, champion_draw,
                                                  reward, progress=f"evaluate {name}", task=task, greedy=cfg.greedy)
        window = min(cfg.ppl_window, context_length(policy[0]) or cfg.ppl_window)
        nll, n_tokens = heldout_nll(policy[0], policy[1], val_texts, window)
        results[name] = _candidate_entry(path, policy[2], metrics, nll, n_tokens, val_chars)
        results[name]["weights_sha256"] = weights_sha256(path)
        if reward is not None and name != REFERENCE:
            results[name]["guard"] = goodhart_guard(draws[name], draws[REFERENCE], cfg.seed)
        del policy
    if champion_draw is not None:
        draws["champion"] = champion_draw
    metric, higher = task.gate()
    best = best_candidate(results, metric, higher)

    report = {
        "best_candidate": best,
        "task": str(task),
        "gate_metric": metric,
        "gate_direction": "higher" if higher else "lower",
        "oracle_labels": task.oracle_labels(),
        "order": list(results),
        "candidates": results,
        "reference": {"name": REFERENCE, "path": str(dirs[REFERENCE])},
        "champion": champion,
        "prompts": {"path": str(prompts_path), "n": len(rows),
                    "sha256": prompts_sha256([r["prompt"] for r in rows])},
        "heldout": {"path": str(Path(inputs["data"]) / "val.jsonl"), "chars": val_chars},
        "reward_model": str(inputs["reward_model"]) if reward is not None else None,
        "reward_hacking": guard_verdicts(results) or None,
        "sampling": {"greedy": cfg.greedy, "temperature": sampling.temperature, "top_p": sampling.top_p,
                     "max_new_tokens": sampling.max_new_tokens, "seed": cfg.seed},
    }
    write_outputs(report, [r["prompt"] for r in rows], draws, out_dir)
    write_best(report, out_dir)
    print(f"evaluate: best candidate {best!r} ({metric} {results[best][metric]:.5f}); "
          "see report.json and report.md")
    return flat_metrics(report)


def run_chat(cfg: Config, inputs: dict[str, Path | None], out_dir: Path, task) -> dict[str, float]:
    """The chat task's evaluation (no oracle): every candidate and the registered champion answer the same
    conversations through the chat template with the same seed, scored by the reward model and the judge against
    the reference's (and the champion's) answers."""
    from alignpipe.core.errors import DataError
    from alignpipe.core.hashing import prompts_sha256, weights_sha256
    from alignpipe.core.io import read_jsonl
    from alignpipe.lm.heldout import heldout_nll
    from alignpipe.lm.models import context_length
    from alignpipe.lm.policy import load_policy
    from alignpipe.lm.reward_model import load_reward_model
    from alignpipe.oracle.chat_eval import chat_metrics, sample_chat, score
    from alignpipe.reports.candidates import write_best
    from alignpipe.reports.evaluation import write_chat_outputs

    if inputs.get("reward_model") is None and not cfg.judge_model:
        raise DataError("--reward-model", f"task {task} has no oracle: evaluate needs a reward model "
                        "(--reward-model) or evaluate.judge_model")
    prompts_path = inputs.get("prompts") or Path(inputs["data"]) / "prompts.jsonl"
    prompts = [row["prompt"] for row in read_jsonl(prompts_path)][:cfg.n_prompts or None]
    sampling = cfg.sampling
    reward = load_reward_model(inputs["reward_model"]) if inputs.get("reward_model") is not None else None
    judge = load_reward_model(cfg.judge_model) if cfg.judge_model else reward

    def answer(policy):  # one answer per conversation, scored
        return score(sample_chat(policy, prompts, sampling, cfg.seed, task, cfg.greedy), prompts, reward, judge)

    val_texts = heldout_text(Path(inputs["data"]), cfg.ppl_max_chars)
    dirs = candidate_dirs(inputs, cfg)
    ref = load_policy(dirs[REFERENCE])
    ref_draw = answer(ref)
    champion, champion_draw = (_chat_champion(cfg, answer, ref, ref_draw, judge is not reward)
                               if cfg.compare_champion else (None, None))
    results, draws = {}, {}
    for name, path in dirs.items():
        policy = ref if name == REFERENCE else load_policy(path)
        got = ref_draw if name == REFERENCE else answer(policy)
        metrics = chat_metrics(policy, got, ref, ref_draw, judge is not reward, cfg.seed, champion=champion_draw)
        window = min(cfg.ppl_window, context_length(policy[0]) or cfg.ppl_window)
        nll, n_tokens = heldout_nll(policy[0], policy[1], val_texts, window)
        results[name] = {"path": str(path), "objective": policy[2].objective, "reward": trained_reward(policy[2]),
                         **metrics, "heldout_ppl": math.exp(nll / max(n_tokens, 1)),
                         "weights_sha256": weights_sha256(path)}
        draws[name] = got
    if champion_draw is not None:
        draws["champion"] = champion_draw
    metric, higher = task.gate()
    best = best_candidate(results, metric, higher)
    report = {
        "best_candidate": best, "task": str(task), "gate_metric": metric,
        "gate_direction": "higher" if higher else "lower", "order": list(results),
        "candidates": results, "reference": {"name": REFERENCE, "path": str(dirs[REFERENCE])}, "champion": champion,
        "prompts": {"path": str(prompts_path), "n": len(prompts),
                    "sha256": prompts_sha256([json.dumps(p, sort_keys=True) for p in prompts])},
        "reward_model": str(inputs["reward_model"]) if reward is not None else None,
        "judge_model": cfg.judge_model or "the reward model", **task.describe(),
        "reward_hacking": guard_verdicts(results) or None,
        "sampling": {"greedy": cfg.greedy, "temperature": sampling.temperature, "top_p": sampling.top_p,
                     "max_new_tokens": sampling.max_new_tokens, "seed": cfg.seed},
    }
    write_chat_outputs(report, prompts, draws, out_dir)
    write_best(report, out_dir)
    print(f"evaluate: best candidate {best!r} ({metric} {results[best].get(metric)}); "
          "see report.json and report.md")
    return chat_flat_metrics(report)


CHAT_KEYS = ("judge_win_rate_vs_ref", "judge_win_rate_vs_champion", "reward_score", "kl_to_ref", "ended_frac",
             "empty_frac", "heldout_ppl")


def chat_flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """metrics.json of a chat evaluation: `C/<metric>` of CHAT_KEYS for each candidate C and the champion
    (finite values only), `best_candidate_index` and `n_candidates`."""
    rows = {**report["candidates"], **({"champion": report["champion"]} if report.get("champion") else {})}
    flat = {f"{name}/{k}": float(m[k]) for name, m in rows.items() for k in CHAT_KEYS
            if isinstance(m.get(k), (int, float)) and math.isfinite(m[k])}
    return {**flat, "best_candidate_index": report["order"].index(report["best_candidate"]),
            "n_candidates": len(report["order"])}


def _with_champion(cfg: Config, use):
    """(registry info, `use(policy)`) of the registered champion, or (None, None) when there is none; its download
    is removed afterwards."""
    from alignpipe.lm.policy import load_policy
    from alignpipe.tracking.policies import champion_policy

    work = Path(tempfile.mkdtemp(prefix="evaluate-champion-"))
    try:
        found = champion_policy(cfg.champion_model, cfg.champion_alias, work)
        if found is None:
            return None, None
        champion, champion_dir = found
        return champion, use(load_policy(champion_dir))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _chat_champion(cfg: Config, answer, ref, ref_draw, judge_distinct: bool):
    """(registry info with its measured metrics, ChatDraw) of the registered champion answering the candidates'
    conversations (`answer(policy)`), or (None, None) when there is none."""
    from alignpipe.oracle.chat_eval import chat_metrics

    def use(policy):
        got = answer(policy)
        return got, chat_metrics(policy, got, ref, ref_draw, judge_distinct, cfg.seed, other_tokenizer=True)

    champion, used = _with_champion(cfg, use)
    if champion is None:
        return None, None
    got, metrics = used
    champion.update(metrics)
    return champion, got


def _draw_champion(cfg: Config, rows: list[dict], sampling, reward, task):
    """(registry info with its oracle summary, Draw) of the registered champion, or (None, None) when there is
    none."""
    from alignpipe.oracle.metrics import summarize
    from alignpipe.oracle.policy_eval import draw

    champion, got = _with_champion(cfg, lambda policy: draw(policy, rows, sampling, cfg.seed, "evaluate champion",
                                                            reward, task=task, greedy=cfg.greedy))
    if champion is None:
        return None, None
    champion.update({**summarize(got.scores, seed=cfg.seed), **task.summarize(got.scores, cfg.seed)})
    if got.rewards is not None:
        champion["reward_score"] = sum(got.rewards) / len(got.rewards)
    return champion, got


def trained_reward(meta) -> str | None:
    """The reward an RL candidate was trained against (its alignpipe.json records it); None for a policy not
    trained by RL."""
    return meta.extra.get("reward")


def goodhart_guard(candidate, reference, seed: int) -> dict[str, Any]:
    """`alignpipe.oracle.guard` on a candidate's and the reference's draws (same prompts, reward model scored)."""
    from alignpipe.oracle.guard import guard
    from alignpipe.oracle.metrics import sample_value

    return guard(candidate.rewards, reference.rewards, [sample_value(s) for s in candidate.scores],
                 [sample_value(s) for s in reference.scores], seed=seed)


def guard_verdicts(results: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Candidate -> one line: the reward-hacking verdict with its numbers (candidates the guard looked at)."""
    from alignpipe.oracle.guard import verdict_line

    return {name: verdict_line(name, m["guard"]) for name, m in results.items() if "guard" in m}


def _candidate_entry(path: Path, meta, metrics: dict[str, Any], nll: float, n_tokens: int,
                     val_chars: int) -> dict[str, Any]:
    """A candidate's report entry: where it came from and what reward it was trained against, its oracle metrics,
    held-out perplexity, reward score."""
    metrics = dict(metrics)
    reward_score = metrics.pop("reward_score", None)
    entry = {"path": str(path), "objective": meta.objective, "reward": trained_reward(meta),
             "kl_estimate": metrics.pop("kl_estimate"), **metrics,
             "heldout_ppl": math.exp(nll / max(n_tokens, 1)), "heldout_nats_per_char": nll / max(val_chars, 1)}
    if reward_score is not None:
        entry["reward_score"] = reward_score
    return entry


def best_candidate(results: dict[str, dict[str, Any]], metric: str, higher: bool) -> str:
    """The candidate best on the gate `metric` (the task's `gate()`); a missing or non-finite value ranks last, ties
    go to the first (the reference)."""
    def value(name: str) -> float:
        v = results[name].get(metric)
        return (v if higher else -v) if isinstance(v, (int, float)) and math.isfinite(v) else -math.inf

    return max(results, key=value)


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """metrics.json: `C/<metric>` for each candidate C (non-finite values left out), the champion's scores,
    `best_candidate_index` (position in report["order"]) and `n_candidates`."""
    keys = ("violations_per_char", "violations_per_char_ci_low", "violations_per_char_ci_high",
            "zero_violation_frac", "empty_frac", "win_rate_vs_ref", "win_rate_vs_champion", "kl_to_ref",
            "reward_score", "heldout_ppl", "heldout_nats_per_char", "win_rate_vs_ref_nontied", "win_rate_ceiling")
    gate = report["gate_metric"]  # the task's own summary (e.g. arith's accuracy) with its interval
    keys += tuple(k for k in (gate, f"{gate}_ci_low", f"{gate}_ci_high") if k not in keys)
    guard_keys = ("rm_pair_accuracy", "rm_spearman", "rm_gain", "oracle_gain", "reward_hacking")
    out: dict[str, float] = {}
    for name, m in report["candidates"].items():
        out.update({f"{name}/{k}": float(m[k]) for k in keys
                    if isinstance(m.get(k), (int, float)) and math.isfinite(m[k])})
        g = m.get("guard") or {}
        out.update({f"{name}/guard/{k}": float(g[k]) for k in guard_keys
                    if isinstance(g.get(k), (int, float)) and math.isfinite(g[k])})
    champion = report.get("champion") or {}
    for k in dict.fromkeys(("violations_per_char", "zero_violation_frac", "reward_score", gate)):
        if isinstance(champion.get(k), (int, float)) and math.isfinite(champion[k]):
            out[f"champion/{k}"] = float(champion[k])
    out["best_candidate_index"] = report["order"].index(report["best_candidate"])
    out["n_candidates"] = len(report["order"])
    return out


