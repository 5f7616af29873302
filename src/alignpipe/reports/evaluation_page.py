"""The evaluate stage's report.json as one page: the setup, every candidate's metrics, the gate decision, the
reward-hacking verdict when the report has one, and the stage's PNG plots inlined as data: URIs."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from alignpipe.reports.evaluation import oracle_labels
from alignpipe.reports.html import document, esc, num

# (report key, column title, significant digits); the CI bounds are shown beside violations/char.
COLUMNS = (
    ("violations_per_char", "violations/char (95% CI)", 4),
    ("zero_violation_frac", "zero-violation", 3),
    ("empty_frac", "empty", 3),
    ("win_rate_vs_ref", "win vs ref", 3),
    ("win_rate_vs_ref_nontied", "win vs ref (non-tied)", 3),
    ("win_rate_vs_champion", "win vs champion", 3),
    ("kl_to_ref", "KL to ref (nats)", 3),
    ("reward_score", "reward", 3),
    ("heldout_ppl", "held-out ppl", 4),
)
CHAT_COLUMNS = (  # the chat task has no oracle: the judge's win rate (the gate), the reward, KL, ended turns
    ("judge_win_rate_vs_ref", "judge win vs ref", 3),
    ("reward_score", "reward", 3),
    ("kl_to_ref", "KL to ref (nats)", 3),
    ("ended_frac", "ended turn", 3),
    ("empty_frac", "empty", 3),
    ("mean_answer_tokens", "answer tokens", 3),
    ("heldout_ppl", "held-out ppl", 4),
)


def _columns(report: dict[str, Any]) -> tuple:
    if report.get("task") == "chat":
        return CHAT_COLUMNS
    names = oracle_labels(report)  # the task's names of the oracle columns (arith: an error rate)
    return tuple((key, f"{names[key]} (95% CI)" if key == "violations_per_char" else names.get(key, title), digits)
                 for key, title, digits in COLUMNS)


def _cell(m: dict[str, Any], key: str, digits: int) -> str:
    text = num(m.get(key), digits)
    if key == "violations_per_char" and text != "n/a" and "violations_per_char_ci_low" in m:
        text += f" ({num(m.get('violations_per_char_ci_low'))}-{num(m.get('violations_per_char_ci_high'))})"
    return f"<td>{esc(text)}</td>"


def _candidates_table(report: dict[str, Any]) -> str:
    columns = _columns(report)
    head = "".join(f"<th>{esc(title)}</th>" for _, title, _ in columns)
    rows = []
    for name in report.get("order") or list(report["candidates"]):
        m = report["candidates"][name]
        best = name == report["best_candidate"]
        label = f"<strong>{esc(name)}</strong> (best)" if best else esc(name)
        rows.append(f'<tr class="candidate{" best" if best else ""}" data-name="{esc(name)}"><td>{label}</td>'
                    f'<td>{esc(m.get("objective", ""))}</td>'
                    + "".join(_cell(m, key, digits) for key, _, digits in columns) + "</tr>")
    champion = report.get("champion")
    if champion:
        rows.append(f'<tr class="champion"><td>champion v{esc(champion.get("version"))}</td><td></td>'
                    + "".join(_cell(champion, key, digits) if key in champion else "<td></td>"
                              for key, _, digits in columns) + "</tr>")
    return (f'<table id="candidates"><thead><tr><th>candidate</th><th>objective</th>{head}</tr></thead>'
            "<tbody>\n" + "\n".join(rows) + "\n</tbody></table>")


def _gate(report: dict[str, Any]) -> str:
    metric, best = report["gate_metric"], report["best_candidate"]
    higher = report.get("gate_direction") == "higher"
    value = report["candidates"][best].get(metric)
    text = (f"Best candidate: <strong>{esc(best)}</strong>, {'highest' if higher else 'lowest'} {esc(metric)} "
            f"({esc(num(value))}; {'higher' if higher else 'lower'} is better).")
    champion = report.get("champion")
    if champion and isinstance(champion.get(metric), (int, float)):
        ahead = isinstance(value, (int, float)) and (value > champion[metric] if higher else value < champion[metric])
        text += (f" Registered champion {esc(champion.get('model', ''))} v{esc(champion.get('version'))}: "
                 f"{esc(num(champion[metric]))}, so the best candidate is "
                 f'<span class="{"good" if ahead else "bad"}">{"ahead of" if ahead else "not ahead of"}</span> it '
                 "(the register stage applies its margin and decides).")
    else:
        text += " No registered champion to compare against."
    return f'<p id="gate" class="summary">{text}</p>'


def _reward_hacking(report: dict[str, Any]) -> str:
    verdict = report.get("reward_hacking")
    if verdict is None:
        return ""
    if isinstance(verdict, dict):
        items = "".join(f"<li>{esc(k)}: {esc(v)}</li>" for k, v in verdict.items())
        return f'<h2>Reward hacking</h2><ul id="reward-hacking">{items}</ul>'
    return f'<h2>Reward hacking</h2><p id="reward-hacking">{esc(verdict)}</p>'


def _plots(out_dir: Path) -> str:
    figures = []
    for png in sorted(out_dir.glob("*.png")):
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        figures.append(f'<figure><img class="plot" alt="{esc(png.stem)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{esc(png.name)}</figcaption></figure>")
    return "<h2>Plots</h2>" + ("\n".join(figures) or "<p>no plots</p>")


def evaluation_html(report: dict[str, Any], out_dir: Path) -> str:
    """The page for an evaluate report.json dict, with the PNG plots found in `out_dir`."""
    s, prompts = report["sampling"], report["prompts"]
    setup = (f'<p class="summary">{prompts["n"]} held-out prompts from <code>{esc(prompts["path"])}</code>, one '
             f'sample each (temperature {esc(s["temperature"])}, top-p {esc(s["top_p"])}, at most '
             f'{esc(s["max_new_tokens"])} new tokens, seed {esc(s["seed"])}); reference: '
             f'<code>{esc(report["reference"]["name"])}</code>. '
             + ("Scored by the reward model and the judge (" + esc(report.get("judge_model", "")) + "); higher is "
                "better for the judge's win rate and the reward, lower for KL and perplexity; ties count half.</p>"
                if report.get("task") == "chat" else
                f"Lower is better for {esc(oracle_labels(report)['violations_per_char'])}, KL and perplexity; win rates count ties as half.</p>"))
    body = ["<h1>alignpipe evaluation</h1>", _gate(report), _candidates_table(report), setup,
            _reward_hacking(report), _plots(out_dir)]
    return document("alignpipe evaluation", "\n".join(part for part in body if part))


def write_evaluation_page(report: dict[str, Any], out_dir: Path) -> Path:
    """Write `out_dir/report.html` for `report`, inlining the plots already in `out_dir`."""
    path = out_dir / "report.html"
    path.write_text(evaluation_html(report, out_dir), encoding="utf-8")
    return path
