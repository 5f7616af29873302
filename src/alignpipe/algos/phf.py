"""The pretraining objectives of Korbak et al. 2023, "Pretraining Language Models with Human Preferences" (PHF,
https://arxiv.org/abs/2302.08582), on segments scored by the PEP8 oracle.

A document is split into segments, one per non-blank line: the whitespace run before the line (newline,
blank lines, indentation) and the line itself. Its score is the oracle's violations on those lines per character
(PHF scores lines the same way); a segment is aligned iff its score <= the threshold (0: no violation).

- MLE and filtering (documents scoring worse than a threshold are dropped) train on plain text;
- conditional training puts `<|aligned|>` or `<|misaligned|>` before each segment, i.e. right before the
  newline that starts its line (`prev<|aligned|>\\n    next`): a byte-level BPE never merges across a
  whitespace/non-whitespace boundary, so the control token never splits the indentation merge, and a prompt that
  ends on a line followed by `<|aligned|>` asks for an aligned next line. Each token is dropped with a
  probability (PHF: 0.1) so the model also learns unconditioned text;
- unlikelihood, RWR and AWR train on plain text with the segment's score as every token's score:
  `token_loss` below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

OBJECTIVES = ("mle", "filter", "conditional", "unlikelihood", "rwr", "awr")


@dataclass(frozen=True)
class Segment:
    """One segment of a document: its text (whitespace run before a non-blank line, then the line) and score."""

    text: str
    violations: int
    score: float  # violations per character of `text`


def split_segments(text: str, line_violations: Sequence[int]) -> list[Segment]:
    """Cut `text` into segments (see the module docstring); they concatenate back to `text`.

    `line_violations[i]` is the oracle's count on line i of `text.splitlines()`; a blank line's count (W293,
    W391) goes to the segment of the next non-blank line, or of the last one at the end.
    """
    lines = text.splitlines(keepends=True)
    if len(line_violations) != len(lines):
        raise ValueError(f"line_violations has {len(line_violations)} entries for {len(lines)} lines")
    starts: list[int] = []  # char offset where each segment starts: the end of the previous line's code
    counts: list[int] = []
    pos, pending, code_end = 0, 0, 0
    for line, n in zip(lines, line_violations):
        if line.strip():
            starts.append(code_end)
            counts.append(n + pending)
            pending = 0
            code_end = pos + len(line.rstrip())
        else:
            pending += n
        pos += len(line)
    if not starts:
        return [Segment(text, pending, pending / max(len(text), 1))] if text else []
    counts[-1] += pending
    bounds = starts + [len(text)]
    out = []
    for i, n in enumerate(counts):
        seg = text[bounds[i]:bounds[i + 1]]
        out.append(Segment(seg, n, n / max(len(seg), 1)))
    return out


def keep_document(violations_per_char: float, threshold: float) -> bool:
    """Filtering: keep a document iff its score is within the threshold (PHF PEP8: 0.002361)."""
    return violations_per_char <= threshold


def control_token(score: float, threshold: float, aligned: str, misaligned: str) -> str:
    """Conditional training's token for a segment: aligned iff its score <= threshold."""
    return aligned if score <= threshold else misaligned


def token_loss(objective: str, logits, targets, scores, values=None, *, threshold: float = 0.0,
               ul_alpha: float = 0.01, rwr_beta: float = 10.0, awr_alpha: float = 0.05, awr_beta: float = 1.0,
               awr_max_weight: float = 1000.0, mask=None):
    """The loss of one batch, averaged over predicted tokens (PHF, apo/objectives.py).

    logits (B, T, V) predict targets (B, T); scores (B, T) are the targets' segment scores (violations/char,
    reward R = -score); values (B, T) are AWR's value-head predictions of R at the same positions; mask (B, T)
    marks the tokens that count (default: all). Returns (loss, logs).

    - mle, filter, conditional: cross-entropy -log p.
    - unlikelihood (Welleck et al. 2019): -log p on aligned tokens (score <= threshold),
      -ul_alpha * log(1 - p) on the others (the paper's definition; PHF's code, given threshold 0, falls back to
      weighting by 1 - score instead).
    - rwr (reward-weighted regression, Peters & Schaal 2007): -log p * exp(R / rwr_beta) (the paper's definition;
      PHF's code ran it as AWR with alpha 1, i.e. against a value head that is never trained).
    - awr (advantage-weighted regression, Peng et al. 2019): awr_alpha * mean(-log p * min(exp((R - V) / awr_beta),
      awr_max_weight)) + (1 - awr_alpha) * mean((V - R)^2), with the advantage not back-propagated into V.
    """
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    logp_target = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    mask = torch.ones_like(logp_target) if mask is None else mask.to(logp_target.dtype)
    n = mask.sum().clamp(min=1)

    def mean(x):
        return (x * mask).sum() / n

    nll = -logp_target
    logs = {"nll": mean(nll).detach()}
    if objective in ("mle", "filter", "conditional"):
        loss = mean(nll)
    elif objective == "unlikelihood":
        aligned = (scores <= threshold).to(nll.dtype)
        one_minus_p = torch.clamp(1.0 - logp_target.exp(), min=1e-20)
        ul = -torch.log(one_minus_p)
        loss = mean(aligned * nll + ul_alpha * (1.0 - aligned) * ul)
        logs["aligned_frac"] = mean(aligned).detach()
    elif objective == "rwr":
        weights = torch.exp(-scores / rwr_beta)
        loss = mean(nll * weights)
        logs["weight_mean"] = mean(weights).detach()
    elif objective == "awr":
        if values is None:
            raise ValueError("awr needs value-head predictions")
        reward = -scores
        values = values.float()
        weights = torch.clamp(torch.exp((reward - values.detach()) / awr_beta), max=awr_max_weight)
        value_loss = mean((values - reward) ** 2)
        loss = awr_alpha * mean(nll * weights) + (1 - awr_alpha) * value_loss
        logs.update(weight_mean=mean(weights).detach(), value_loss=value_loss.detach())
    else:
        raise ValueError(f"unknown objective {objective!r}; objectives: {', '.join(OBJECTIVES)}")
    return loss, logs


def nats_per_char(total_nll: float, total_chars: int) -> float:
    """Held-out loss in nats per character (comparable across tokenizers and control-token schemes)."""
    return total_nll / total_chars if total_chars else math.nan
