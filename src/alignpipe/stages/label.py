"""RLAIF labelling: sample K completions per training prompt from the policy, pair them, and let a judge pick.

For each training prompt (`data/train_prompts.jsonl`), K completions are sampled from the policy through
`alignpipe.lm.policy.sample` (its conditioning and its completion unit: one logical line; a row cut at
`max_new_tokens` mid-line is drawn again, up to `cap_retries` times), paired (all K(K-1)/2
pairs, as InstructGPT, or disjoint pairs), and judged (`alignpipe.oracle.judges`: the oracle scorer, a reward model or an
LLM). Pairs with an invalid completion (blank, or not starting a new line) or two identical ones are dropped;
so are, by default, pairs with a completion the oracle cannot check (a tokenize error, E9: pycodestyle stops
checking there, so a garbled line can look clean); ties (|score gap| <= tie_threshold) are dropped or kept.
Human-labelled pairs (`--human-prefs`) are checked by the validate stage and mixed in.

Outputs, TRL's standard preference form plus provenance, one pair per line:
`prompt` (raw, without the policy's control tokens), `chosen`, `rejected` (completions, starting with "\\n"),
`score_chosen`, `score_rejected` (the judge's scores, HIGHER = preferred: minus violations/char for the scorer,
the reward for a reward model, P(preferred) for the llm judge, 1/0 for human pairs), `oracle_chosen`,
`oracle_rejected` (the oracle's violations per character, LOWER = better, for every pair), `judge`, `context`,
`source`.
- `prefs.jsonl`: the training pairs; `heldout.jsonl`: the pairs whose prompt hashes into the held-out fraction
  (deterministic: sha256 of seed and prompt; `alignpipe.algos.preference.split_heldout`, as reward splits a single
  file), kept out of training for the reward model's evaluation. Human pairs are read as dpo reads its pairs
  (`alignpipe.algos.preference.read_pairs`).

On the chat task (`run_chat`) there is no oracle: the pairs are the dataset's own (its preference labels, which
`data build --dataset` split into data/prefs.jsonl and data/heldout.jsonl), in conversational form; with
`judge: reward_model` and `--judge-model`, or `judge: llm` (with `--judge-model`, any causal LM, or without: the
policy judges its own answers), K answers per training conversation are also sampled through the chat template
(ending the turn), paired, and labelled by that judge (RLAIF); answers that did not end their turn within
`max_new_tokens`, blank ones and identical pairs are dropped and counted. The llm judge reads the conversation and
both answers in `llm_template` (default `alignpipe.oracle.judges.CHAT_LLM_TEMPLATE`), in both orders, averaged;
a pair is a tie when the averaged scores are within `tie_threshold`; its position consistency (both orders
prefer the same answer) is reported. A conversational task with an oracle (arith) labels sampled answers with its
oracle under the default `judge: scorer` (a correct answer over a wrong one; pairs the oracle ties are dropped). With
an oracle, the rows of sampled answers carry `oracle_chosen`/`oracle_rejected`, and a judge other than the oracle
reports `judge_oracle_agreement` (over the pairs the oracle decides, how often the judge prefers the oracle's better
answer, judge ties half) and `oracle_decided_frac` in metrics.json beside `judge_position_consistency`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from alignpipe.core.config import MAX_BATCH, MAX_REPEATS, MAX_ROWS, MAX_SEED, MAX_TOKENS, StageConfig, field
from alignpipe.core.errors import DataError
from alignpipe.core.hashing import hash01
from alignpipe.core.io import HELDOUT_FILE, PREFS_FILE
from alignpipe.lm.policy import Sampling
from alignpipe.stages import Input

INPUTS = (
    Input("data", "data", "data directory (uses train_prompts.jsonl) or a prompts JSONL file"),
    Input("policy", "artifacts/pretrain", "policy directory to sample from (alignpipe.lm.policy.save_policy)"),
    Input("judge_model", None, "reward model directory or causal LM (path or id) for judge=reward_model/llm",
          required=False),
    Input("human_prefs", None, "optional JSONL of human-labelled pairs (prompt, chosen, rejected) to mix in",
          required=False),
)
# Input files checked by the validate stage's validators (the `validate` params section's limits) before any work.
CHECKED_INPUTS = {"human_prefs": "prefs"}
METRICS = ("n_pairs", "n_ties", "mean_score_gap", "cap_reached_frac", "seconds")
# What the stage reports for a task without an oracle (chat; alignpipe.run.runner.required_metrics).
JUDGED_METRICS = ("n_pairs", "n_train_pairs", "n_heldout_pairs", "n_dataset_pairs", "seconds")
# The few metrics `dvc metrics show` lists (metrics_headline.json; fnmatch patterns); metrics.json has all.
HEADLINE = ("n_pairs", "mean_score_gap", "seconds")


@dataclass(frozen=True)
class Config(StageConfig):
    SECTION: ClassVar[str] = "label"
    RENAMED: ClassVar[dict[str, str]] = {k: f"sampling.{k}" for k in ("temperature", "top_p", "max_new_tokens",
                                                                       "batch_size")}

    judge: Literal["scorer", "reward_model", "llm"] = field("scorer", "who prefers: the oracle scorer, a reward "
                                                            "model (--judge-model) or an LLM (--judge-model; on "
                                                            "chat without it, the policy itself)")
    n_prompts: int = field(384, "training prompts to label (chosen by a hash; 0 = all)", ge=0, le=MAX_ROWS)
    k: int = field(4, "completions sampled per prompt", ge=2, le=MAX_BATCH)
    pairing: Literal["all", "disjoint"] = field("all", "pairs per prompt: all K(K-1)/2, or (1,2), (3,4), ...")
    keep_ties: bool = field(False, "keep tied pairs (chosen = the first sample); default: drop them")
    drop_unscorable: bool = field(True, "drop pairs with a completion pycodestyle cannot tokenize (E9: it stops "
                                  "checking there, so the oracle's count is no judgement)")
    tie_threshold: float = field(0.0, "a pair is a tie when |score_a - score_b| <= this", ge=0)
    heldout_frac: float = field(0.1, "fraction of prompts (by hash) whose pairs go to heldout.jsonl", ge=0, lt=1)
    sampling: Sampling = field(Sampling(max_new_tokens=32, batch_size=256), "how the k completions per prompt "
                               "are sampled (batch_size: rows, prompt x sample, per generate call)")
    cap_retries: int = field(3, "rows whose sample reached max_new_tokens mid-line are sampled again (a new draw), "
                             "up to this many times, so pairs are of finished lines (0 = never)", ge=0, le=MAX_REPEATS)
    judge_batch_size: int = field(32, "pairs per forward pass of a model judge", ge=1, le=MAX_BATCH)
    judge_max_length: int = field(512, "max tokens a model judge reads (the last ones are kept)", ge=8, le=MAX_TOKENS)
    llm_template: str = field("", "llm judge prompt with {prompt}, {a}, {b} (empty: alignpipe.oracle.judges."
                              "LLM_TEMPLATE, or CHAT_LLM_TEMPLATE on chat)")
    llm_answers: list[str] = field([" A", " B"], "llm judge answer strings for the first and second completion")
    llm_chat_template: bool = field(False, "wrap the llm judge prompt in the tokenizer's chat template (a chat "
                                    "judge; its answers then usually start without a space: llm_answers [A, B])")
    human_pairs: int = field(-1, "human pairs mixed in from --human-prefs (chosen by hash; -1 = all)",
                             ge=-1, le=MAX_ROWS)
    trust_remote_code: bool = field(False, "allow custom model code for a hub judge model")
    seed: int = field(0, "seed of prompt selection, sampling and the held-out split", ge=0, le=MAX_SEED)

    def __post_init__(self):
        super().__post_init__()
        self.check(self.pairing == "all" or self.k % 2 == 0, "k", "must be even with pairing=disjoint")
        self.check(len(self.llm_answers) == 2 and len(set(self.llm_answers)) == 2, "llm_answers",
                   "must be two different strings")
        if self.llm_template:  # a template the judge cannot fill: refused when the config is built, not after sampling
            from alignpipe.oracle.judges import check_template

            check_template(self.llm_template)


def index_pairs(k: int, pairing: str) -> list[tuple[int, int]]:
    """Indices of the sample pairs of one prompt."""
    if pairing == "disjoint":
        return [(i, i + 1) for i in range(0, k - 1, 2)]
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def valid_completion(text: str) -> bool:
    """A completion in the unit of the preference files: a new, non-blank line (a sample that never produced a
    newline continues the prompt's last line instead) without a NUL character (the preference-file validators
    that reward and dpo run on label's output reject it)."""
    return text.startswith("\n") and bool(text.strip()) and "\x00" not in text


def candidate_pairs(completions: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], int, int]:
    """Distinct pairs of valid completions of one prompt: (pairs, n_invalid, n_identical) where the counts are
    the pairs dropped for an invalid completion (blank, or not a new line) or for two equal ones (also equal to
    an earlier pair)."""
    seen: set[frozenset] = set()
    pairs, n_invalid, n_identical = [], 0, 0
    for a, b in completions:
        if not valid_completion(a) or not valid_completion(b):
            n_invalid += 1
        elif a == b or frozenset((a, b)) in seen:
            n_identical += 1
        else:
            seen.add(frozenset((a, b)))
            pairs.append((a, b))
    return pairs, n_invalid, n_identical


def load_train_prompts(path: Path, n: int, seed: int) -> list[dict]:
    """`n` training prompts (all when 0), chosen by a hash of their source (a uniform pick, not the file's first
    rows, which are sorted by file name), then in file order."""
    from alignpipe.oracle.policy_eval import load_prompts

    path = path / "train_prompts.jsonl" if path.is_dir() else path
    rows = load_prompts(path)
    if n and n < len(rows):
        keys = sorted(range(len(rows)), key=lambda i: hash01(f"{rows[i].get('source', '')}|{rows[i]['prompt']}",
                                                             seed))
        rows = [rows[i] for i in sorted(keys[:n])]
    return rows


def _human_rows(rows: list[dict], cfg: Config, score) -> list[dict]:
    from alignpipe.oracle.judges import Pair, oracle

    if cfg.human_pairs >= 0:
        order = sorted(range(len(rows)), key=lambda i: hash01("human:" + rows[i]["prompt"] + rows[i]["chosen"],
                                                              cfg.seed))
        rows = [rows[i] for i in sorted(order[:cfg.human_pairs])]
    pairs = [Pair(r["prompt"], r["chosen"], r["rejected"], r.get("context") or r["prompt"]) for r in rows]
    out = []
    for r, p, (oc, orj) in zip(rows, pairs, oracle(pairs, score)):
        out.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                    "score_chosen": float(r.get("score_chosen", 1.0)),
                    "score_rejected": float(r.get("score_rejected", 0.0)),
                    "oracle_chosen": oc, "oracle_rejected": orj, "judge": str(r.get("judge", "human")),
                    "context": p.context, "source": str(r.get("source", "human"))})
    return out


def _unique(rows: list[dict]) -> list[dict]:
    """The rows without repeated (prompt, {chosen, rejected}) pairs, first kept (a prompt text can recur)."""
    seen: set[tuple] = set()
    out = []
    for r in rows:
        key = (r["prompt"], frozenset((r["chosen"], r["rejected"])))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def build_judge(cfg: Config, judge_model: Path | str | None, score):
    """The configured judge (the model is loaded here); `score` is the task's oracle (the scorer judge's)."""
    from alignpipe.oracle.judges import LLM_TEMPLATE, LLMJudge, RewardModelJudge, ScorerJudge

    if cfg.judge == "scorer":
        return ScorerJudge(score)
    if judge_model is None:
        raise DataError("--judge-model", f"judge={cfg.judge} needs a model: a directory or a model id")
    if cfg.judge == "reward_model":
        return RewardModelJudge(str(judge_model), cfg.judge_batch_size, cfg.judge_max_length, cfg.trust_remote_code)
    return LLMJudge(str(judge_model), cfg.llm_template or LLM_TEMPLATE, cfg.llm_answers, cfg.judge_batch_size,
                    cfg.judge_max_length, cfg.llm_chat_template, cfg.trust_remote_code)


def judge_pairs(judge, pairs, cfg: Config, score) -> tuple[list[dict], dict[str, float]]:
    """Judge `pairs` (judges.Pair): rows in the output form and the label statistics (ties, mean score gap of
    the rows, and, for a judge other than the oracle, its agreement with the oracle `score`, the task's)."""
    from alignpipe.oracle.judges import LLMJudge, oracle, position_consistency

    orders = judge.orders(pairs) if isinstance(judge, LLMJudge) else None  # the llm judge: both orders
    scores = LLMJudge.averaged(orders) if orders is not None else judge.score(pairs)
    oracles = oracle(pairs, score)
    rows, n_ties, agree, n_oracle_decided = [], 0, 0.0, 0
    for p, (sa, sb), (oa, ob) in zip(pairs, scores, oracles):
        tie = abs(sa - sb) <= cfg.tie_threshold
        n_ties += tie
        if oa != ob:  # the oracle decides this pair: does the judge prefer the oracle's better completion?
            n_oracle_decided += 1
            agree += 0.5 if tie else float((sa > sb) == (oa < ob))
        if tie and not cfg.keep_ties:
            continue
        flip = sb > sa
        rows.append({"prompt": p.prompt, "chosen": p.b if flip else p.a, "rejected": p.a if flip else p.b,
                     "score_chosen": sb if flip else sa, "score_rejected": sa if flip else sb,
                     "oracle_chosen": ob if flip else oa, "oracle_rejected": oa if flip else ob,
                     "judge": judge.name, "context": p.context, "source": p.source})
    gaps = [r["score_chosen"] - r["score_rejected"] for r in rows]
    stats = {"n_judged": len(pairs), "n_ties": n_ties,
             "mean_score_gap": sum(gaps) / len(gaps) if gaps else 0.0,
             "oracle_decided_frac": n_oracle_decided / max(len(pairs), 1)}
    if judge.name != "scorer":
        stats["judge_oracle_agreement"] = agree / n_oracle_decided if n_oracle_decided else 0.5
    if orders is not None:
        stats["judge_position_consistency"] = position_consistency(orders)
    return rows, stats


def sample_to_line_end(policy, rows: list[str], sampling, seed: int, retries: int, unit) -> tuple[list, int]:
    """One sample per row (`alignpipe.lm.policy.sample`, ending where the task's `unit` says); the rows whose sample
    reached the cap mid-line are drawn again with the next seed, up to `retries` times, and keep the last draw.
    Returns (samples, the number capped at the first draw). The pairs are then of the policy's finished lines (its
    samples given that the line ends within the cap), not truncated ones the oracle cannot judge."""
    from alignpipe.lm.policy import sample

    samples = sample(*policy, rows, sampling, seed=seed, progress="label: sampling", unit=unit)
    first = sum(s.capped for s in samples)
    for attempt in range(1, retries + 1):
        redo = [i for i, s in enumerate(samples) if s.capped]
        if not redo:
            break
        again = sample(*policy, [rows[i] for i in redo], sampling, seed=seed + attempt,
                       progress=f"label: {len(redo)} capped rows, draw {attempt + 1}", unit=unit)
        for i, s in zip(redo, again):
            samples[i] = s
    return samples, first


def sampled_pairs(prompts: list[dict], samples: list, cfg: Config) -> tuple[list, list[bool], int, int]:
    """The candidate pairs (judges.Pair) of each prompt's K samples (`samples` in prompt order, K per prompt):
    (pairs, per pair whether a completion reached max_new_tokens mid-line, n_invalid, n_identical)."""
    from alignpipe.oracle.judges import Pair

    pairs, capped, n_invalid, n_identical = [], [], 0, 0
    for i, row in enumerate(prompts):
        group = samples[i * cfg.k:(i + 1) * cfg.k]
        completions = [s.completion for s in group]
        cut = {s.completion for s in group if s.capped}
        found, invalid, identical = candidate_pairs([(completions[a], completions[b])
                                                   for a, b in index_pairs(cfg.k, cfg.pairing)])
        n_invalid += invalid
        n_identical += identical
        pairs += [Pair(row["prompt"], a, b, row["context"], str(row.get("source", ""))) for a, b in found]
        capped += [a in cut or b in cut for a, b in found]
    return pairs, capped, n_invalid, n_identical


def scorable_pairs(pairs: list, capped: list[bool], score) -> tuple[list, int, int]:
    """(the pairs whose two completions the oracle `score` (the task's) can check, n dropped, n dropped among those
    with a completion cut at the cap): a completion is unscorable when its score is `truncated` (PEP8: a tokenize
    error, E9, after which pycodestyle stops checking)."""
    from alignpipe.oracle.judges import oracle_score

    keep = [not (oracle_score(score, p.context, p.a).truncated or oracle_score(score, p.context, p.b).truncated)
            for p in pairs]
    n_capped = sum(c and not k for c, k in zip(capped, keep))
    return [p for p, k in zip(pairs, keep) if k], keep.count(False), n_capped


def run_chat(cfg: Config, inputs: dict[str, Path | None], out_dir: Path, task) -> dict[str, float]:
    """The chat task: the dataset's pairs, plus (judge reward_model or llm) sampled answer pairs labelled by the
    judge."""
    import json

    from alignpipe.algos.preference import read_pairs, split_heldout
    from alignpipe.core.errors import ConfigError
    from alignpipe.core.io import write_jsonl

    data = Path(inputs["data"])
    judge_model = inputs.get("judge_model")
    if (cfg.judge == "scorer" and judge_model is not None) or (cfg.judge == "reward_model" and judge_model is None):
        raise ConfigError("label.judge", f"task {task}: the dataset's pairs (judge scorer, no --judge-model), "
                          "or RLAIF pairs as well: judge reward_model with --judge-model, or judge llm (with "
                          "--judge-model, or the policy as its own judge)")
    train, heldout = read_pairs(data / PREFS_FILE, messages=True), read_pairs(data / HELDOUT_FILE, messages=True)
    n_dataset = len(train) + len(heldout)
    stats: dict[str, float] = {}
    if cfg.judge != "scorer" or task.has_oracle():  # a judge, or the task's oracle as the scorer
        judged, stats = rlaif_chat_pairs(cfg, inputs, task)
        def key(r):
            return json.dumps([r["prompt"], r["chosen"], r["rejected"]], sort_keys=True)

        seen = {key(r) for r in train + heldout}  # a judged pair the dataset (or another sample) already holds
        judged = [r for r in judged if key(r) not in seen and not seen.add(key(r))]
        judged_train, judged_heldout = split_heldout(judged, cfg.heldout_frac, cfg.seed)
        train += judged_train
        heldout += judged_heldout
    write_jsonl(out_dir / PREFS_FILE, train)
    write_jsonl(out_dir / HELDOUT_FILE, heldout)
    return {"n_pairs": len(train) + len(heldout), "n_train_pairs": len(train), "n_heldout_pairs": len(heldout),
            "n_dataset_pairs": n_dataset, **stats}


def rlaif_chat_pairs(cfg: Config, inputs: dict[str, Path | None], task) -> tuple[list[dict], dict[str, float]]:
    """K answers per training conversation (chat template, end of turn), all pairs of answers that ended their
    turn, labelled by the judge (reward model or llm; higher score chosen; ties dropped unless keep_ties)."""
    from alignpipe.core.io import read_jsonl
    from alignpipe.lm.policy import load_policy
    from alignpipe.oracle.chat_eval import sample_chat

    start = time.perf_counter()
    prompts = [r["prompt"] for r in read_jsonl(Path(inputs["data"]) / "train_prompts.jsonl")]
    prompts = prompts[:cfg.n_prompts or None]
    sampling = cfg.sampling
    policy = load_policy(inputs["policy"])
    got = sample_chat(policy, [p for p in prompts for _ in range(cfg.k)], sampling, cfg.seed, task)
    pairs, n_dropped = [], 0
    for i, prompt in enumerate(prompts):
        for a, b in index_pairs(cfg.k, cfg.pairing):
            (ta, ea), (tb, eb) = ((got.completions[i * cfg.k + j], got.ended[i * cfg.k + j]) for j in (a, b))
            if ea and eb and ta and tb and ta != tb:
                pairs.append((prompt, ta, tb))
            else:
                n_dropped += 1
    scores, judge_stats = chat_pair_scores(cfg, inputs.get("judge_model"), policy, pairs, task)
    oracles, oracle_stats = chat_oracle_agreement(cfg, task, pairs, scores)
    rows, stats = order_chat_pairs(pairs, scores, cfg, oracles)
    return rows, {**stats, **judge_stats, **oracle_stats, "n_dropped_unended_pairs": n_dropped,
                  "cap_reached_frac": 1 - sum(got.ended) / max(len(got.ended), 1),
                  "sampling_and_judging_seconds": round(time.perf_counter() - start, 2)}


def chat_oracle_agreement(cfg: Config, task, pairs: list[tuple],
                          scores: list[tuple[float, float]]) -> tuple[list[tuple[float, float]] | None, dict]:
    """Where the task has an oracle: its (a, b) values of each judged (conversation, a, b) pair (violations per
    character after the conversation, lower is better) and, for a judge other than the oracle itself, the judge's
    agreement with it (`alignpipe.oracle.judges.oracle_agreement`); (None, {}) without an oracle."""
    from alignpipe.oracle.judges import oracle_agreement

    if not task.has_oracle():
        return None, {}
    oracle = task.oracle()
    oracles = [(oracle(p, a).per_char, oracle(p, b).per_char) for p, a, b in pairs]
    if cfg.judge == "scorer":
        return oracles, {}
    agreement, decided = oracle_agreement(scores, oracles, cfg.tie_threshold)
    return oracles, {"judge_oracle_agreement": agreement, "oracle_decided_frac": decided}


def chat_pair_scores(cfg: Config, judge_model: Path | str | None, policy, pairs: list[tuple],
                     task) -> tuple[list[tuple[float, float]], dict[str, float]]:
    """The judge's scores (higher preferred) of each (conversation, answer a, answer b), and its own statistics:
    the scorer is the task's oracle (minus violations per character: arith's correct answer over a wrong one); a
    reward model scores each answer as one assistant turn after the conversation (as the reward stage trains it);
    the llm judge (`judge_model`, or the policy = (model, tok, meta) itself) compares both answers in both orders,
    averaged, and reports its position consistency."""
    if cfg.judge == "scorer":
        oracle = task.oracle()
        return [(-oracle(p, a).per_char, -oracle(p, b).per_char) for p, a, b in pairs], {}
    if cfg.judge == "reward_model":
        from alignpipe.lm.reward_model import load_reward_model, reward_scores

        judge, jtok = load_reward_model(judge_model, cfg.trust_remote_code)
        flat = [(p, c) for p, a, b in pairs for c in (a, b)]
        scores = reward_scores(judge, jtok, [p for p, _ in flat], [c for _, c in flat], cfg.judge_batch_size,
                               cfg.judge_max_length) if flat else []
        return [(scores[2 * k], scores[2 * k + 1]) for k in range(len(pairs))], {}
    from alignpipe.oracle.judges import CHAT_LLM_TEMPLATE, LLMJudge, Pair, conversation_text, position_consistency

    template = cfg.llm_template or CHAT_LLM_TEMPLATE
    own = {"model": policy[0], "tok": policy[1]} if judge_model is None else {}
    judge = LLMJudge(str(judge_model or "policy"), template, cfg.llm_answers, cfg.judge_batch_size,
                     cfg.judge_max_length, cfg.llm_chat_template, cfg.trust_remote_code, **own)
    orders = judge.orders([Pair(conversation_text(p), a, b) for p, a, b in pairs]) if pairs else []
    return LLMJudge.averaged(orders), {"judge_position_consistency": position_consistency(orders),
                                       "judge_is_policy": float(judge_model is None)}


def order_chat_pairs(pairs: list[tuple], scores: list[tuple[float, float]], cfg: Config,
                     oracles: list[tuple[float, float]] | None = None) -> tuple[list[dict], dict[str, float]]:
    """Conversational preference rows of judged (conversation, a, b) pairs: the higher score chosen (a on a kept
    tie); a pair whose scores are within `tie_threshold` is a tie, dropped unless keep_ties. `oracles`, when given:
    the oracle's (a, b) values of each pair (lower is better), carried as oracle_chosen/oracle_rejected."""
    rows, n_ties = [], 0
    for k, ((prompt, a, b), (sa, sb)) in enumerate(zip(pairs, scores, strict=True)):
        tie = abs(sa - sb) <= cfg.tie_threshold
        n_ties += tie
        if tie and not cfg.keep_ties:
            continue
        flip = sb > sa
        (chosen, sc), (rejected, sr) = ((b, sb), (a, sa)) if flip else ((a, sa), (b, sb))
        row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
               "rejected": [{"role": "assistant", "content": rejected}], "score_chosen": sc,
               "score_rejected": sr, "judge": cfg.judge, "source": "rlaif"}
        if oracles is not None:
            oa, ob = oracles[k]
            row.update(oracle_chosen=ob if flip else oa, oracle_rejected=oa if flip else ob)
        rows.append(row)
    gaps = [r["score_chosen"] - r["score_rejected"] for r in rows]
    return rows, {"n_judged": len(pairs), "n_ties": n_ties, "mean_score_gap": sum(gaps) / len(gaps) if gaps else 0.0}


def run(cfg: Config, inputs: dict[str, Path | None], out_dir: Path) -> dict[str, float]:
    """Sample, pair, judge; write prefs.jsonl and heldout.jsonl."""
    import torch

    from alignpipe.algos.preference import read_pairs, split_heldout
    from alignpipe.core.io import write_jsonl
    from alignpipe.tasks import task_of

    task = task_of(inputs["data"])  # a prompts file rather than a data directory: the default task
    if task.conversational():  # the dataset's pairs of conversations (+ judged answers)
        return run_chat(cfg, inputs, out_dir, task)
    from alignpipe.core.errors import ConfigError
    from alignpipe.lm.policy import load_policy

    score = task.oracle()  # every sampled pair is scored by the task's oracle (oracle_chosen, oracle_rejected)
    if score is None:
        raise ConfigError("data.task", f"task {task} has no oracle, which label's sampled text pairs are scored with")
    torch.manual_seed(cfg.seed)
    prompts = load_train_prompts(inputs["data"], cfg.n_prompts, cfg.seed)
    human = []
    if inputs.get("human_prefs") is not None:  # TRL's standard form (conversational rows flattened, as dpo does)
        human = read_pairs(inputs["human_prefs"])

    start = time.perf_counter()
    model, tok, meta = load_policy(inputs["policy"])
    sampling = cfg.sampling
    repeated = [r["prompt"] for r in prompts for _ in range(cfg.k)]  # K rows per prompt: K different draws
    samples, first_capped = sample_to_line_end((model, tok, meta), repeated, sampling, cfg.seed, cfg.cap_retries,
                                               task.completion_unit())
    sampling_s = time.perf_counter() - start
    del model

    pairs, capped, n_invalid, n_identical = sampled_pairs(prompts, samples, cfg)
    n_unscorable = n_unscorable_capped = 0
    if cfg.drop_unscorable:
        pairs, n_unscorable, n_unscorable_capped = scorable_pairs(pairs, capped, score)

    start = time.perf_counter()
    judge = build_judge(cfg, inputs.get("judge_model"), score)
    judged, stats = judge_pairs(judge, pairs, cfg, score)
    judged = _unique(judged)
    judging_s = time.perf_counter() - start
    rows = _unique(judged + (_human_rows(human, cfg, score) if human else []))
    if not rows:
        raise DataError(str(inputs["policy"]), f"no preference pairs: {len(pairs)} judged, {stats['n_ties']} ties; "
                        f"dropped {n_invalid} with an invalid completion (blank, not a new line) and "
                        f"{n_identical} with identical completions")

    train, heldout = split_heldout(rows, cfg.heldout_frac, cfg.seed)
    if cfg.heldout_frac > 0 and not heldout:
        raise DataError("label.heldout_frac", f"no held-out pairs among {len(rows)}: label more prompts")
    if not train:
        raise DataError("label.heldout_frac", f"no training pairs left among {len(rows)}: label more prompts")
    write_jsonl(out_dir / PREFS_FILE, train)
    write_jsonl(out_dir / HELDOUT_FILE, heldout)

    decided = [r for r in judged if r["oracle_chosen"] != r["oracle_rejected"]]
    n_sampled = len(prompts) * len(index_pairs(cfg.k, cfg.pairing))  # pairs before any is dropped
    n_tie_dropped = 0 if cfg.keep_ties else stats["n_ties"]
    return {
        "n_pairs": len(rows), "n_train_pairs": len(train), "n_heldout_pairs": len(heldout),
        "n_human_pairs": len(rows) - len(judged), "n_prompts": len(prompts), "n_samples": len(samples),
        "n_invalid_pairs": n_invalid, "n_identical_pairs": n_identical, "n_unscorable_pairs": n_unscorable,
        "n_unscorable_capped_pairs": n_unscorable_capped,
        "n_unscorable_other_pairs": n_unscorable - n_unscorable_capped,
        "cap_reached_frac": first_capped / max(len(samples), 1),
        "cap_final_frac": sum(s.capped for s in samples) / max(len(samples), 1),
        "kept_pair_frac": (len(pairs) - n_tie_dropped) / max(n_sampled, 1),
        "dropped_capped_frac": n_unscorable_capped / max(n_sampled, 1),
        "dropped_unscorable_other_frac": (n_unscorable - n_unscorable_capped) / max(n_sampled, 1),
        "dropped_tie_frac": n_tie_dropped / max(n_sampled, 1),
        **stats,
        "oracle_chosen_mean": sum(r["oracle_chosen"] for r in judged) / max(len(judged), 1),
        "oracle_rejected_mean": sum(r["oracle_rejected"] for r in judged) / max(len(judged), 1),
        "oracle_chosen_better_frac": sum(r["oracle_chosen"] < r["oracle_rejected"] for r in decided)
        / max(len(decided), 1),
        "sampling_seconds": round(sampling_s, 2), "judging_seconds": round(judging_s, 2),
    }
