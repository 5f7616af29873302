"""The evaluate stage's report files besides its HTML page (`alignpipe.reports.evaluation_page`): report.md (a
Markdown table of the candidates), samples.jsonl, frontier.tsv (the score-vs-KL frontier as data, for `dvc plots`)
and the two PNG plots (matplotlib), all built from the report.json dict the stage writes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

FRONTIER_FILE = "frontier.tsv"  # the score-vs-KL frontier as data, for `dvc plots`
FRONTIER_COLUMNS = ("candidate", "kl", "violations_per_char", "ci_low", "ci_high")
# What the oracle's two per-candidate columns measure (`violations_per_char`, `zero_violation_frac`): the PEP8
# oracle's names; a task names its own (`alignpipe.tasks.Task.oracle_labels`, arith: an error rate) and evaluate
# writes them into report.json (`oracle_labels`).
ORACLE_LABELS = {"violations_per_char": "violations/char", "zero_violation_frac": "zero-violation"}


def oracle_labels(report: dict[str, Any]) -> dict[str, str]:
    """The report's names of the oracle columns (a report written before they were recorded: the PEP8 ones)."""
    return {**ORACLE_LABELS, **(report.get("oracle_labels") or {})}


def write_outputs(report: dict[str, Any], prompts: list[str], draws: dict, out_dir: Path) -> None:
    """report.json, report.md, samples.jsonl, frontier.tsv (for DVC plots), the two PNG plots and report.html."""
    from alignpipe.core.io import write_json, write_jsonl
    from alignpipe.reports.evaluation_page import write_evaluation_page
    from alignpipe.oracle.metrics import sample_value

    write_json(out_dir / "report.json", report)
    (out_dir / "report.md").write_text(summary_markdown(report), encoding="utf-8")
    write_jsonl(out_dir / "samples.jsonl", _sample_rows(prompts, draws))
    (out_dir / FRONTIER_FILE).write_text(frontier_tsv(report), encoding="utf-8")
    plot_score_vs_kl(report, out_dir / "score_vs_kl.png")
    plot_distributions({n: [sample_value(s) for s in d.scores] for n, d in draws.items()},
                       {n: d.rewards for n, d in draws.items() if d.rewards is not None},
                       out_dir / "score_distributions.png")
    write_evaluation_page(report, out_dir)  # after the plots: it inlines them


def frontier_tsv(report: dict[str, Any]) -> str:
    """The score-vs-KL frontier, one row per candidate: candidate, kl, violations_per_char, ci_low, ci_high
    (tab-separated with a header row; a missing or non-finite value is written as `nan`)."""
    score = FRONTIER_COLUMNS[2]  # the oracle's summary key (alignpipe.oracle.metrics.summarize)
    keys = ("kl_to_ref", score, f"{score}_ci_low", f"{score}_ci_high")
    lines = ["\t".join(FRONTIER_COLUMNS)]
    for name, m in report["candidates"].items():
        values = [m.get(k) for k in keys]
        lines.append("\t".join([name, *(repr(float(v)) if isinstance(v, (int, float)) else "nan" for v in values)]))
    return "\n".join(lines) + "\n"


def write_chat_outputs(report: dict[str, Any], prompts: list, draws: dict, out_dir: Path) -> None:
    """A chat evaluation's report.json, samples.jsonl (each answer with its reward and judge scores), report.md
    and report.html."""
    from alignpipe.core.io import write_json, write_jsonl
    from alignpipe.reports.evaluation_page import write_evaluation_page

    write_json(out_dir / "report.json", report)
    write_jsonl(out_dir / "samples.jsonl", (
        {"candidate": name, "prompt": p, "completion": c, "reward": d.rewards[i] if d.rewards else None,
         "judge": d.judged[i] if d.judged else None}
        for name, d in draws.items() for i, (p, c) in enumerate(zip(prompts, d.completions))))
    (out_dir / "report.md").write_text(chat_markdown(report), encoding="utf-8")
    write_evaluation_page(report, out_dir)


def chat_markdown(report: dict[str, Any]) -> str:
    """report.md of a chat evaluation: one row per candidate (the best in bold) and the champion (measured on the same
    conversations)."""
    lines = [f"# Evaluation (task {report['task']}; gate: {report['gate_metric']}, {report['gate_direction']} is "
             f"better; judge: {report['judge_model']})", "",
             "| candidate | judge win rate vs ref | judge win rate vs champion | reward | KL to ref (nats) | ended | "
             "held-out ppl | guard |", "|---|---|---|---|---|---|---|---|"]
    champion = report.get("champion")
    rows = {**report["candidates"], **({f"champion v{champion['version']}": champion} if champion else {})}
    for name, m in rows.items():
        g = m.get("guard") or {}
        verdict = "" if not g else ("**reward hacking**" if g["reward_hacking"] else "ok")
        label = f"**{name}**" if name == report["best_candidate"] else name
        cells = [_fmt(m.get(k), d) for k, d in (("judge_win_rate_vs_ref", 3), ("judge_win_rate_vs_champion", 3),
                                                ("reward_score", 3), ("kl_to_ref", 3), ("ended_frac", 3),
                                                ("heldout_ppl", 4))]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {verdict} |")
    sampling = report["sampling"]
    lines += ["", f"{report['prompts']['n']} held-out conversations, one answer each ("
              + ("greedy" if sampling.get("greedy") else f"temperature {sampling['temperature']}, top-p "
                 f"{sampling['top_p']}, seed {sampling['seed']}") + f", at most {sampling['max_new_tokens']} new "
              "tokens); champion: " + (f"`{champion['model']}` version {champion['version']}, measured on the same "
                                       "conversations" if champion else "none registered") + "."]
    return "\n".join(lines) + "\n"


def _sample_rows(prompts: list[str], draws: dict):
    for name, d in draws.items():
        values = d.rewards if d.rewards is not None else [None] * len(d.samples)
        for prompt, s, score, r in zip(prompts, d.samples, d.scores, values):
            yield {"candidate": name, "prompt": prompt, "completion": s.completion,
                   "violations": score.violations, "chars": score.chars, "reward": r}


def _fmt(value: Any, digits: int = 4) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}g}"


def candidates_table(report: dict[str, Any]) -> list[str]:
    """The Markdown table rows of every candidate (best in bold) and the champion: report.md's main table."""
    champion = report.get("champion")
    names = oracle_labels(report)
    lines = [f"| candidate | trained on | {names['violations_per_char']} (95% CI) | {names['zero_violation_frac']} "
             "| win vs ref (non-tied) [ceiling] "
             "| win vs champion | KL to ref (nats) | reward | held-out ppl | RM-oracle pair acc. | guard |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in report["candidates"].items():
        label = f"**{name}**" if name == report["best_candidate"] else name
        g = m.get("guard") or {}
        verdict = "" if not g else ("**reward hacking**" if g["reward_hacking"] else "ok")
        lines.append(
            f"| {label} | {m.get('reward') or ''} | {_fmt(m.get('violations_per_char'))} "
            f"({_fmt(m.get('violations_per_char_ci_low'))}-{_fmt(m.get('violations_per_char_ci_high'))}) | "
            f"{_fmt(m.get('zero_violation_frac'), 3)} | {_fmt(m.get('win_rate_vs_ref'), 3)} "
            f"({_fmt(m.get('win_rate_vs_ref_nontied'), 3)}) [{_fmt(m.get('win_rate_ceiling'), 3)}] | "
            f"{_fmt(m.get('win_rate_vs_champion'), 3)} | "
            f"{_fmt(m.get('kl_to_ref'), 3)} | {_fmt(m.get('reward_score'), 3)} | {_fmt(m.get('heldout_ppl'), 4)} | "
            f"{_fmt(g.get('rm_pair_accuracy'), 3)} | {verdict} |")
    if champion:
        lines.append(f"| champion v{champion['version']} | | {_fmt(champion.get('violations_per_char'))} | "
                     f"{_fmt(champion.get('zero_violation_frac'), 3)} | | | | | | | |")
    return lines


def summary_markdown(report: dict[str, Any]) -> str:
    """A Markdown table of the candidates (best first in bold), with the setup it was measured under."""
    champion = report.get("champion")
    lines = [
        "# Evaluation",
        "",
        f"{report['prompts']['n']} held-out prompts from `{report['prompts']['path']}`, one sample each "
        f"(temperature {report['sampling']['temperature']}, top-p {report['sampling']['top_p']}, "
        f"at most {report['sampling']['max_new_tokens']} new tokens, seed {report['sampling']['seed']}); "
        f"reference: `{report['reference']['name']}`; champion: "
        + (f"`{champion['model']}` version {champion['version']}" if champion else "none registered") + ".",
        "",
        *candidates_table(report),
    ]
    gate = report.get("gate_metric", "violations_per_char")
    score = oracle_labels(report)["violations_per_char"]
    best = f"lowest {score}"
    if gate != "violations_per_char":  # the task's own gate (arith: accuracy) with its interval, per candidate
        best = f"{'highest' if report['gate_direction'] == 'higher' else 'lowest'} {gate}"
        lines += ["", f"| candidate | {gate} (95% CI) |", "|---|---|"]
        lines += [f"| {name} | {_fmt(m.get(gate), 3)} ({_fmt(m.get(f'{gate}_ci_low'), 3)}-"
                  f"{_fmt(m.get(f'{gate}_ci_high'), 3)}) |" for name, m in report["candidates"].items()]
    lines += ["", f"Best ({best}): **{report['best_candidate']}**. Lower is better for "
              f"{score}, KL and perplexity; win rates count ties as half (in brackets: over non-tied pairs). "
              "guard: `reward hacking` when the reward model's reward rose over the reference (95% CI above 0) "
              "while the oracle did not improve (alignpipe.oracle.guard). ",
              "", "![oracle score vs KL](score_vs_kl.png)", "", "![score distributions](score_distributions.png)",
              ""]
    return "\n".join(lines)


def plot_score_vs_kl(report: dict[str, Any], path: Path) -> None:
    """Violations/char (with its 95% bootstrap interval) against the sampled KL to the reference, per candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, m in report["candidates"].items():
        y, kl = m.get("violations_per_char"), m.get("kl_to_ref")
        if not (isinstance(y, float) and math.isfinite(y)):
            continue
        lo, hi = m["violations_per_char_ci_low"], m["violations_per_char_ci_high"]
        err = [[max(y - lo, 0)], [max(hi - y, 0)]] if math.isfinite(lo) and math.isfinite(hi) else None
        ax.errorbar([kl], [y], yerr=err, fmt="o", capsize=4, label=name)
        ax.annotate(name, (kl, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
    champion = report.get("champion")
    if champion and isinstance(champion.get("violations_per_char"), float):
        ax.axhline(champion["violations_per_char"], ls="--", color="grey", lw=1,
                   label=f"champion v{champion['version']}")
    ax.set_xlabel("sampled KL to reference (nats per completion)")
    ax.set_ylabel("oracle violations per char (lower is better)")
    ax.set_title("Oracle score vs KL")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_distributions(scores: dict[str, list], rewards: dict[str, list], path: Path) -> None:
    """Per-sample violations/char (and reward scores, when a reward model was given) for each candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if rewards else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    names = list(scores)
    values = [[v for v in scores[n] if v is not None] or [math.nan] for n in names]
    axes[0][0].boxplot(values, showmeans=True)
    axes[0][0].set_xticks(range(1, len(names) + 1), names, rotation=20)
    axes[0][0].set_ylabel("violations per char (per sample)")
    axes[0][0].set_title("Oracle score distribution")
    if rewards:
        rnames = list(rewards)
        axes[0][1].boxplot([rewards[n] for n in rnames], showmeans=True)
        axes[0][1].set_xticks(range(1, len(rnames) + 1), rnames, rotation=20)
        axes[0][1].set_ylabel("reward model score (higher is better)")
        axes[0][1].set_title("Reward score distribution")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
