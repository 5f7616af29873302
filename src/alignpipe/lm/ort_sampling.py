"""Policy sampling on the exported ONNX KV-cache decoder, with the completion unit of the `task` (an
`alignpipe.tasks.Task`, passed in): pep8's `alignpipe.lm.policy.sample`, chat's `alignpipe.oracle.chat_eval.sample_chat`.

The same conditioning (`task.format_prompt`: `meta.format_prompt` for text, the chat template with the generation
prompt for messages; the last `max_prompt_tokens` prompt tokens, left padding), the same constraints (banned tokens;
`task.first_token_ids`: pep8's first token starts a new line), the same stop (a stop token of `task.stop_token_ids`,
or `task.completion_done`: pep8's finished logical line) and the same post-processing (`task.finish_completion`). Greedy decoding therefore gives `sample(..., greedy=True)`'s completions (and chat
answers equal to a greedy `generate()` stopped at the same tokens); sampling applies temperature then top-p as
`generate()` does, from numpy's generator (same distribution, not the same draws as torch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alignpipe.lm.batching import pad
from alignpipe.lm.onnx_runtime import OrtPolicy
from alignpipe.lm.policy import PolicyMeta, banned_token_ids, encode_prompts


@dataclass(frozen=True)
class Decoding:
    """Per-request generation settings."""

    max_new_tokens: int = 48  # cap on generated tokens
    do_sample: bool = True  # False: greedy
    temperature: float = 0.7  # PHF's sampling settings
    top_p: float = 0.9


class OrtCompleter:
    """Completions from one ONNX policy session (the vocabulary tables computed once): one logical line of code per
    prompt string (pep8), or the assistant's turn per list of {"role", "content"} messages (chat)."""

    def __init__(self, policy: OrtPolicy, tok, meta: PolicyMeta, max_prompt_tokens: int, task):
        self.policy, self.tok, self.meta, self.max_prompt_tokens, self.task = policy, tok, meta, max_prompt_tokens, task
        self.start_ids = task.first_token_ids(tok)
        self.bad = banned_token_ids(tok, meta)
        self.stops = set(task.stop_token_ids(tok))

    def complete(self, prompts: list, decoding: Decoding, rng: np.random.Generator) -> list[str]:
        """One cleaned completion per prompt, all prompts in one batch."""
        return [self.finish(row) for row in self.generate(prompts, decoding, rng)]

    def generate(self, prompts: list, decoding: Decoding, rng: np.random.Generator) -> list[list[int]]:
        """The new token ids of each prompt, up to and with the token that stopped it."""
        encoded = encode_prompts(self.tok, self.meta, prompts, self.max_prompt_tokens, self.task)
        ids, mask = pad(encoded, self.tok.pad_token_id, side="left")
        return self._generate(ids, mask, decoding, rng)

    def finish(self, new_ids: list[int]) -> str:
        """The completion text of `generate`'s ids, as the task's sampler cleans it."""
        return self.task.finish_completion(self.tok, self.meta, new_ids)

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
                if int(token[r]) in self.stops or self.task.completion_done(tok, new[r]):
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
