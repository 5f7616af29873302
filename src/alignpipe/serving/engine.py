"""Continuous batching over the exported ONNX KV-cache decoder: one decoder loop per process.

Each generated sequence (a `Job`: one choice of one prompt) joins the running batch at the next step and leaves it
when it ends, so a short answer never waits for a long one and a new request never waits for a batch to finish
(iteration-level scheduling: Yu et al. 2022, Orca; vLLM). Each joining prompt is prefilled on its own, then its KV
cache is left-padded to the running batch's length and concatenated on the batch axis; the
graph computes positions from the attention mask (`alignpipe.lm.onnx_runtime.position_ids_from_mask`), so padding
columns change nothing but cost. Finished rows are sliced out and all-padding columns trimmed.

Tokens are chosen as `alignpipe.lm.ort_sampling.OrtCompleter` chooses them (banned tokens, the task's first-token
rule, its stop tokens and `completion_done`, `finish`), so a greedy job's text equals the task's greedy completion
(evaluate's). Every job draws from its own generator, so a seeded request answers the same whatever it is batched
with. Jobs wait in a bounded queue (`QueueFull` when it is full) and carry a deadline (`TimedOut`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from alignpipe.lm.ort_sampling import Decoding, OrtCompleter


class QueueFull(Exception):
    """The waiting queue holds `max_queue` jobs: the request is refused (HTTP 503)."""


class TimedOut(Exception):
    """A job passed its deadline before it ended (HTTP 504)."""


@dataclass
class Job:
    """One sequence to generate. `emit(kind, job)` is called from the decoder thread: "delta" after each token
    (streaming jobs), then once "done" (`text`, `finish_reason` set) or "error" (`error` set)."""

    prompt_ids: list[int]
    decoding: Decoding
    rng: np.random.Generator
    emit: Callable[[str, "Job"], None]
    deadline: float
    stop: tuple[str, ...] = ()  # strings that end the completion (not included in it)
    stream: bool = False
    new: list[int] = field(default_factory=list)
    text: str = ""  # the completion (set when done)
    sent: str = ""  # what streaming has emitted so far
    delta: str = ""  # the latest streamed piece
    finish_reason: str | None = None
    error: Exception | None = None
    cancelled: bool = False  # set by the request (client gone): the job leaves at the next step


class Engine:
    """The decoder loop (a daemon thread) and its bounded queue.

    Waiting jobs join when the batch is empty, when `join_min` of them wait, or after `join_wait_steps` decoding
    steps (default: at the next step; a join copies the batch's cache once, about a tenth of a step, and waiting
    for company doubled the time to the first token: benchmarks/results/serve_load.md). Ended rows stay in the
    batch (their outputs unused) until the next join or until they are half the batch, so the cache is copied once
    for both."""

    def __init__(self, completer: OrtCompleter, max_batch_size: int = 32, max_queue: int = 256,
                 join_min: int = 1, join_wait_steps: int = 1):
        self.completer, self.max_batch_size, self.max_queue = completer, max_batch_size, max_queue
        self.join_min, self.join_wait_steps = join_min, join_wait_steps
        self.policy = completer.policy
        self.pending: deque[Job] = deque()
        self.cond = threading.Condition()
        self.running: list[Job] = []  # the batch's rows, ended ones included until the next compaction
        self.mask: np.ndarray | None = None  # (batch, columns) attention mask of the running batch's cache
        self.past: list = []  # its present keys/values (OrtValues), as the last step returned them
        self.steps = 0
        self.waited = 0  # decoding steps since a job started waiting
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True, name="decoder")
        self.thread.start()

    # ------------------------------------------------------------------------------------------------ requests
    def encode(self, prompts: list) -> list[list[int]]:
        """Prompt token ids as the task formats them (the last `max_prompt_tokens`)."""
        from alignpipe.lm.policy import encode_prompts

        c = self.completer
        return encode_prompts(c.tok, c.meta, prompts, c.max_prompt_tokens, c.task)

    def submit(self, jobs: list[Job]) -> None:
        """Queue `jobs` (one request's) together, or raise QueueFull."""
        with self.cond:
            if len(self.pending) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self.pending)} sequences are waiting (limit {self.max_queue})")
            self.pending.extend(jobs)
            self.cond.notify()

    def alive(self) -> bool:
        return self.thread.is_alive() and not self.stopping

    def live(self) -> int:
        """Rows of the batch still generating."""
        return sum(_live(j) for j in self.running)

    def close(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=10)

    # ---------------------------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while True:
            joining: list[Job] = []
            with self.cond:
                while not self.pending and not self.running and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                live = self.live()
                room = self.max_batch_size - live
                if self.pending and room > 0 and (not live or len(self.pending) >= self.join_min
                                                  or self.waited >= self.join_wait_steps):
                    joining = [self.pending.popleft() for _ in range(min(room, len(self.pending)))]
                    self.waited = 0
                elif self.pending:
                    self.waited += 1
            try:
                for job in self.running:
                    if _live(job):
                        self._keep(job)
                joining = [j for j in joining if self._keep(j)]
                if joining:
                    self._join(joining)
                elif 2 * self.live() <= len(self.running):
                    self._compact()
                if self.running:
                    self._step()
            except Exception as e:  # a failed step fails the jobs in it, never the loop
                for job in self.running + joining:
                    if _live(job):
                        job.error = e
                        job.emit("error", job)
                self.running, self.mask, self.past = [], None, []

    def _keep(self, job: Job) -> bool:
        """False (and the job told) when the job was cancelled or is past its deadline."""
        if job.cancelled:
            return False
        if time.monotonic() > job.deadline:
            job.error = TimedOut("the request timed out")
            job.emit("error", job)
            return False
        return True

    def _join(self, jobs: list[Job]) -> None:
        """Prefill `jobs` one by one (a batched prefill pads every prompt to the longest, and onnxruntime gains
        nothing from batching it here: 3 prompts of 80 tokens cost 3 times one), choose their first tokens, and merge
        their caches with the running batch's live rows (one copy)."""
        policy = self.policy
        prefilled = []
        for job in jobs:
            ids = np.array([job.prompt_ids], dtype=np.int64)
            mask = np.ones_like(ids)
            logits, past = policy._step(policy.session.io_binding(), ids, mask, policy._empty_past(1))
            prefilled.append((logits[0, -1], mask, past))
        self._advance(jobs, np.stack([x[0] for x in prefilled]), first=True)
        keep = [i for i, j in enumerate(self.running) if _live(j)]
        new = [i for i, j in enumerate(jobs) if _live(j)]
        groups = [(self.mask, self.past, keep)] if keep else []
        groups += [(prefilled[i][1], prefilled[i][2], [0]) for i in new]
        self.running = [self.running[i] for i in keep] + [jobs[i] for i in new]
        self._rebuild(groups)

    def _compact(self) -> None:
        """Drop the ended rows from the batch and its cache."""
        keep = [i for i, j in enumerate(self.running) if _live(j)]
        if len(keep) == len(self.running):
            return
        self.running = [self.running[i] for i in keep]
        self._rebuild([(self.mask, self.past, keep)] if keep else [])

    def _rebuild(self, groups: list[tuple[np.ndarray, list, list[int]]]) -> None:
        """The batch's mask and cache from `groups` of (mask, cache, rows to take), stacked in order, in one copy:
        each group's columns no kept row attends to are dropped, and every group is left-padded (mask 0, cache
        zeros) to the widest."""
        if not groups:
            self.mask, self.past = None, []
            return
        firsts = [int(np.argmax(m[rows].any(axis=0))) for m, _, rows in groups]
        width = max(m.shape[1] - f for (m, _, _), f in zip(groups, firsts))
        n = sum(len(rows) for _, _, rows in groups)
        heads, dim = self.policy.n_head, self.policy.head_dim
        mask = np.zeros((n, width), dtype=np.int64)
        arrays = [np.empty((n, heads, width, dim), dtype=np.float32) for _ in groups[0][1]]
        r = 0
        for (m, past, rows), first in zip(groups, firsts):
            cols = m.shape[1] - first
            off = width - cols
            sources = [_numpy(p) for p in past]
            for row in rows:
                mask[r, off:] = m[row, first:]
                for out, src in zip(arrays, sources):
                    if off:
                        out[r, :, :off] = 0.0
                    out[r, :, off:] = src[row, :, first:]
                r += 1
        self.mask, self.past = mask, [_ortvalue(a) for a in arrays]

    def _step(self) -> None:
        """One token for every live row (ended rows are fed their last token; their outputs are unused)."""
        policy = self.policy
        tokens = np.array([[j.new[-1]] for j in self.running], dtype=np.int64)
        mask = np.concatenate([self.mask, np.ones((len(self.running), 1), dtype=np.int64)], axis=1)
        logits, self.past = policy._step(policy.session.io_binding(), tokens, mask, self.past)
        self.mask = mask
        self.steps += 1
        self._advance(self.running, logits[:, -1, :], first=False)

    def _advance(self, jobs: list[Job], scores: np.ndarray, first: bool) -> None:
        """Choose each live job's next token from its last-position logits; jobs that end are told."""
        c = self.completer
        rows = [r for r, j in enumerate(jobs) if _live(j)]
        if not rows:
            return
        scores = scores[rows].astype(np.float32, copy=True)
        if c.bad:
            scores[:, c.bad] = -np.inf
        if first and c.start_ids:
            start = np.full_like(scores, -np.inf)
            start[:, c.start_ids] = scores[:, c.start_ids]
            scores = start
        tokens = _choose(scores, [jobs[r] for r in rows])
        for r, token in zip(rows, tokens):
            job = jobs[r]
            job.new.append(int(token))
            if self._ended(job):
                job.emit("done", job)
            elif job.stream:
                self._stream(job)

    def _ended(self, job: Job) -> bool:
        """Whether `job` ended with its last token (setting its text and finish reason)."""
        c, token = self.completer, job.new[-1]
        stopped = token in c.stops or c.task.completion_done(c.tok, job.new)
        text = c.finish(job.new) if (stopped or job.stop or len(job.new) >= job.decoding.max_new_tokens) else None
        if text is not None and job.stop:
            cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, stopped = text[:cut], True
        if stopped or len(job.new) >= job.decoding.max_new_tokens:
            job.text, job.finish_reason = text, "stop" if stopped else "length"
            return True
        return False

    def _stream(self, job: Job) -> None:
        """Emit the new part of an unfinished completion. Only what cannot change is sent: trailing whitespace
        and any tail that might begin a stop string are held back until a later token decides them (the rest of
        the text comes with "done")."""
        text = self.completer.finish(job.new).rstrip()
        for s in job.stop:  # hold back a suffix that is a prefix of a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    text = text[:-k]
                    break
        if text.startswith(job.sent) and len(text) > len(job.sent):
            job.delta, job.sent = text[len(job.sent):], text
            job.emit("delta", job)


def _live(job: Job) -> bool:
    return job.finish_reason is None and job.error is None and not job.cancelled


def _choose(scores: np.ndarray, jobs: list[Job], k: int = 128) -> np.ndarray:
    """Each row's token: greedy argmax, or a draw from its own generator after its temperature and top-p
    (`alignpipe.lm.ort_sampling._draw`'s distribution, for all sampled rows at once). The nucleus is looked for
    among the `k` likeliest tokens first (sorting the whole vocabulary costs most of a step); only the rows whose
    top-p mass lies beyond them (or top_p 1) are sorted whole."""
    tokens = scores.argmax(-1)
    sampled = [r for r, j in enumerate(jobs) if j.decoding.do_sample]
    if not sampled:
        return tokens
    temperature = np.array([[jobs[r].decoding.temperature] for r in sampled], dtype=np.float32)
    top_p = np.array([jobs[r].decoding.top_p for r in sampled])
    x = scores[sampled] / temperature
    probs = np.exp(x - x.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    u = np.array([jobs[r].rng.random() for r in sampled])  # one draw per sampled job and step, in job order
    vocab = probs.shape[-1]
    whole = np.ones(len(sampled), dtype=bool)
    picked = np.empty(len(sampled), dtype=tokens.dtype)
    if k < vocab:
        ids = np.argpartition(-probs, k, axis=-1)[:, :k]
        cand = np.take_along_axis(probs, ids, -1)
        whole = (cand.sum(-1) < top_p) | (top_p >= 1.0)
        part = ~whole
        if part.any():
            picked[part] = _nucleus(ids[part], cand[part], top_p[part], u[part])
    if whole.any():
        rows = probs[whole]
        picked[whole] = _nucleus(np.broadcast_to(np.arange(vocab), rows.shape), rows, top_p[whole], u[whole])
    tokens[sampled] = picked
    return tokens


def _nucleus(ids: np.ndarray, cand: np.ndarray, top_p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The token each row's uniform draw `u` picks among candidate tokens `ids` with probabilities `cand`, after
    top-p: the smallest prefix of the sorted candidates whose mass reaches top_p (the token that crosses it
    included), renormalized."""
    order = np.argsort(-cand, axis=-1, kind="stable")
    ids, sorted_p = np.take_along_axis(ids, order, -1), np.take_along_axis(cand, order, -1)
    top_p = top_p[:, None]
    sorted_p[((sorted_p.cumsum(-1) - sorted_p) >= top_p) & (top_p < 1.0)] = 0.0
    sorted_p /= sorted_p.sum(-1, keepdims=True)
    pick = np.minimum((sorted_p.cumsum(-1) < u[:, None]).sum(-1), sorted_p.shape[-1] - 1)
    return ids[np.arange(len(ids)), pick]


def _numpy(value) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()


def _ortvalue(array: np.ndarray):
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
