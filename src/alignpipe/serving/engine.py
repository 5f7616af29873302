"""Continuous batching over the exported ONNX KV-cache decoder: one decoder loop per process.

Each generated sequence (a `Job`: one choice of one prompt) joins the running batch at the next step and leaves it
when it ends, so a short answer never waits for a long one and a new request never waits for a batch to finish
(vLLM's "iteration-level scheduling", Yu et al. 2022, Orca). A joining group is prefilled on its own (its prompts
left-padded), then its KV cache is left-padded to the running batch's length and concatenated on the batch axis; the
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

from alignpipe.lm.batching import pad
from alignpipe.lm.ort_sampling import Decoding, OrtCompleter, _draw


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
    """The decoder loop (a daemon thread) and its bounded queue."""

    def __init__(self, completer: OrtCompleter, max_batch_size: int = 32, max_queue: int = 256):
        self.completer, self.max_batch_size, self.max_queue = completer, max_batch_size, max_queue
        self.policy = completer.policy
        self.pending: deque[Job] = deque()
        self.cond = threading.Condition()
        self.running: list[Job] = []
        self.mask: np.ndarray | None = None  # (batch, columns) attention mask of the running batch's cache
        self.past: list = []  # its present keys/values (OrtValues), as the last step returned them
        self.steps = 0
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

    def close(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=10)

    # ---------------------------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.running and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                room = self.max_batch_size - len(self.running)
                joining = [self.pending.popleft() for _ in range(min(room, len(self.pending)))]
            try:
                self._drop_expired()
                joining = [j for j in joining if self._keep(j)]
                if joining:
                    self._join(joining)
                if self.running:
                    self._step()
            except Exception as e:  # a failed step fails the jobs in it, never the loop
                for job in self.running + joining:
                    if job.finish_reason is None and job.error is None:
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

    def _drop_expired(self) -> None:
        keep = [i for i, job in enumerate(self.running) if self._keep(job)]
        if len(keep) < len(self.running):
            self._select(keep)

    def _join(self, jobs: list[Job]) -> None:
        """Prefill `jobs` (left-padded), choose their first tokens, and merge their cache into the running batch."""
        policy = self.policy
        ids, mask = pad([j.prompt_ids for j in jobs], self.completer.tok.pad_token_id, side="left")
        logits, past = policy._step(policy.session.io_binding(), ids, mask, policy._empty_past(len(jobs)))
        alive = self._advance(jobs, logits[:, -1, :], first=True)
        if not alive:
            return
        if len(alive) < len(jobs):
            jobs, mask, past = [jobs[i] for i in alive], mask[alive], [_ortvalue(_numpy(p)[alive]) for p in past]
        if not self.running:
            self.running, self.mask, self.past = jobs, mask, past
            return
        width = max(mask.shape[1], self.mask.shape[1])
        old_mask, old_past = _left_pad(self.mask, self.past, width)
        new_mask, new_past = _left_pad(mask, past, width)
        self.mask = np.concatenate([old_mask, new_mask], axis=0)
        self.past = [_ortvalue(np.concatenate([a, b], axis=0)) for a, b in zip(old_past, new_past)]
        self.running = self.running + jobs

    def _step(self) -> None:
        """One token for every running row; ended rows leave."""
        policy = self.policy
        tokens = np.array([[j.new[-1]] for j in self.running], dtype=np.int64)
        mask = np.concatenate([self.mask, np.ones((len(self.running), 1), dtype=np.int64)], axis=1)
        logits, self.past = policy._step(policy.session.io_binding(), tokens, mask, self.past)
        self.mask = mask
        self.steps += 1
        alive = self._advance(self.running, logits[:, -1, :], first=False)
        if len(alive) < len(self.running):
            self._select(alive)

    def _select(self, rows: list[int]) -> None:
        """Keep only `rows` of the running batch, and drop the cache columns no kept row attends to."""
        self.running = [self.running[i] for i in rows]
        if not rows:
            self.mask, self.past = None, []
            return
        mask = self.mask[rows]
        first = int(np.argmax(mask.any(axis=0)))
        self.mask = mask[:, first:]
        self.past = [_ortvalue(np.ascontiguousarray(_numpy(p)[rows][:, :, first:])) for p in self.past]

    def _advance(self, jobs: list[Job], scores: np.ndarray, first: bool) -> list[int]:
        """Choose each job's next token from its last-position logits; returns the indices of the jobs that go on."""
        c = self.completer
        scores = scores.astype(np.float32, copy=True)
        if c.bad:
            scores[:, c.bad] = -np.inf
        if first and c.start_ids:
            start = np.full_like(scores, -np.inf)
            start[:, c.start_ids] = scores[:, c.start_ids]
            scores = start
        greedy = scores.argmax(-1)
        alive = []
        for r, job in enumerate(jobs):
            if job.cancelled:
                continue
            d = job.decoding
            token = int(greedy[r]) if not d.do_sample else int(_draw(scores[r:r + 1], d, job.rng)[0])
            job.new.append(token)
            if self._ended(job):
                job.emit("done", job)
            else:
                if job.stream:
                    self._stream(job)
                alive.append(r)
        return alive

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


def _numpy(value) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()


def _ortvalue(array: np.ndarray):
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))


def _left_pad(mask: np.ndarray, past: list, width: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The mask and cache widened on the left to `width` columns (mask 0, cache zeros)."""
    extra = width - mask.shape[1]
    arrays = [_numpy(p) for p in past]
    if extra == 0:
        return mask, arrays
    mask = np.concatenate([np.zeros((len(mask), extra), dtype=mask.dtype), mask], axis=1)
    return mask, [np.concatenate([np.zeros(a.shape[:2] + (extra,) + a.shape[3:], a.dtype), a], axis=2)
                  for a in arrays]
