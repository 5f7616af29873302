"""Policy sampling on the exported ONNX KV-cache decoder, with the completion unit of `alignpipe.lm.policy.sample`.

The same conditioning (`meta.format_prompt`, the last `max_prompt_tokens` prompt tokens, left padding), the same
constraints (banned tokens, a first token that starts a new line), the same stop (a row ends once its completion
holds a finished logical line, or at EOS) and the same post-processing (`finish_completion`). Greedy decoding
therefore gives `sample(..., greedy=True)`'s completions; sampling applies temperature then top-p as `generate()`
does, from numpy's generator (same distribution, not the same draws as torch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alignpipe.lm.batching import pad
from alignpipe.lm.onnx_runtime import OrtPolicy
from alignpipe.lm.policy import (PolicyMeta, banned_token_ids, encode_prompts, finish_completion, line_complete,
                                 newline_ids)


@dataclass(frozen=True)
class Decoding:
    """Per-request generation settings."""

    max_new_tokens: int = 48  # cap on generated tokens
    do_sample: bool = True  # False: greedy
    temperature: float = 0.7  # PHF's sampling settings
    top_p: float = 0.9


class OrtCompleter:
    """Completions of plain prompts from one ONNX policy session (the vocabulary tables computed once)."""

    def __init__(self, policy: OrtPolicy, tok, meta: PolicyMeta, max_prompt_tokens: int):
        self.policy, self.tok, self.meta, self.max_prompt_tokens = policy, tok, meta, max_prompt_tokens
        self.line_ids, self.start_ids = newline_ids(tok)
        self.bad = banned_token_ids(tok, meta)

    def complete(self, prompts: list[str], decoding: Decoding, rng: np.random.Generator) -> list[str]:
        """One cleaned completion per prompt (whitespace kept), all prompts in one batch."""
        encoded = encode_prompts(self.tok, self.meta, prompts, self.max_prompt_tokens)
        ids, mask = pad(encoded, self.tok.pad_token_id, side="left")
        new = self._generate(ids, mask, decoding, rng)
        return [finish_completion(self.tok, self.meta, row)[1] for row in new]

    def _generate(self, ids: np.ndarray, mask: np.ndarray, decoding: Decoding,
                  rng: np.random.Generator) -> list[list[int]]:
        tok, policy = self.tok, self.policy
        batch = len(ids)
        binding = policy.session.io_binding()
        past = policy._empty_past(batch)
        done = np.zeros(batch, dtype=bool)
        new: list[list[int]] = [[] for _ in range(batch)]
        step_ids = ids
        for t in range(decoding.max_new_tokens):
            logits, past = policy._step(binding, step_ids, mask, past)
            scores = logits[:, -1, :].astype(np.float32, copy=True)
            if self.bad:
                scores[:, self.bad] = -np.inf
            if t == 0 and self.start_ids:
                start = np.full_like(scores, -np.inf)
                start[:, self.start_ids] = scores[:, self.start_ids]
                scores = start
            token = _draw(scores, decoding, rng)
            token = np.where(done, tok.pad_token_id, token)
            for r in np.flatnonzero(~done):
                new[r].append(int(token[r]))
                if token[r] == tok.eos_token_id or (int(token[r]) in self.line_ids and line_complete(
                        tok.decode(new[r], skip_special_tokens=True))):
                    done[r] = True
            if done.all():
                break
            step_ids = token[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=mask.dtype)], axis=1)
        return new


def _draw(scores: np.ndarray, decoding: Decoding, rng: np.random.Generator) -> np.ndarray:
    """Greedy argmax, or a draw after temperature and top-p (generate()'s warper order)."""
    if not decoding.do_sample:
        return scores.argmax(-1)
    scores = scores / decoding.temperature
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if decoding.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, -1)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= decoding.top_p
        sorted_p[drop] = 0.0
        probs = np.zeros_like(probs)
        np.put_along_axis(probs, order, sorted_p, -1)
        probs /= probs.sum(-1, keepdims=True)
    u = rng.random((len(scores), 1))
    return np.minimum((probs.cumsum(-1) < u).sum(-1), scores.shape[-1] - 1)
