"""The task plug-in: what differs between tasks, as methods the stages call (they never test a task's name).

A task is chosen once, where the data is built: `data.task` in params is a built-in name (`pep8`, `chat`, `arith`) or a
user's class as `package.module:Name` (the spec style of the reward functions, `alignpipe.algos.rewards`). The data
stage records it in MANIFEST.json; later stages read it from there (`task_of`). A plug-in subclasses `Task` and
implements its abstract methods; `load_task` says in one line which one is missing (docs/tasks.md).
"""

from __future__ import annotations

import importlib
import inspect
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

from alignpipe.core.errors import ConfigError, DataError
from alignpipe.lm.policy import CompletionUnit

MANIFEST_FILE = "MANIFEST.json"
DEFAULT_TASK = "pep8"


class Task(ABC):
    """What the stages need to know about a task. `name` is the spec it was loaded from (`pep8`, `pkg.mod:Name`)."""

    name: str = ""

    def __str__(self) -> str:
        return self.name

    # ---------------------------------------------------------------------------------------------------- data
    @abstractmethod
    def conversational(self) -> bool:
        """Whether a prompt is TRL's conversational form (a list of role/content messages) rather than a string."""

    def build_data(self, cfg, inputs: dict[str, Path | None], out_dir: Path) -> dict[str, float]:
        """Build the task's own data into `out_dir` when no `data.dataset` is given (`cfg`: the data stage's config;
        write train/val/test.jsonl with `text`, prompts.jsonl and train_prompts.jsonl with `prompt`, and
        MANIFEST.json with `write_manifest`); returns the data stage's metrics. By default a task has no data of
        its own."""
        raise ConfigError("data.dataset", f"task {self} has no data of its own: give data.dataset "
                          "(--dataset PATH_OR_ID)")

    def check_dataset(self, conversational: bool, where: str) -> None:
        """Reject a `data.dataset` whose rows do not fit the task (`conversational`: prompts are messages)."""
        if self.conversational() and not conversational:
            raise DataError(where, f"task {self} needs conversational rows (prompt as a list of messages)")

    # ----------------------------------------------------------------------------------------------- prompting
    @abstractmethod
    def format_prompt(self, prompt: Any, tok, meta=None) -> str:
        """The text the policy is conditioned on for `prompt` (`meta`: the policy's `PolicyMeta`, or None)."""

    def check_tokenizer(self, tok, where: str) -> None:
        """A ConfigError when the policy's tokenizer cannot prompt this task (`where`: the key to fix)."""

    def stop_token_ids(self, tok) -> list[int]:
        """Token ids that end a completion besides the task's own rule (`completion_done`): EOS."""
        return [tok.eos_token_id] if tok.eos_token_id is not None else []

    def completion_unit(self) -> CompletionUnit:
        """Where a completion of the policy sampler (`alignpipe.lm.policy.sample`) ends: at EOS by default."""
        return CompletionUnit()

    # The ONNX sampler's unit (`alignpipe.lm.ort_sampling`): the same ends as the task's torch sampler.
    def first_token_ids(self, tok) -> list[int]:
        """The tokens a completion may start with (empty: any)."""
        return []

    def completion_done(self, tok, new_ids: list[int]) -> bool:
        """Whether the completion generated so far (`new_ids`, its last token just drawn) has ended by the task's
        own rule (a stop token ends it regardless)."""
        return False

    def finish_completion(self, tok, meta, new_ids: list[int]) -> str:
        """The completion text of generated ids, as the task's samplers clean it."""
        return tok.decode(new_ids, skip_special_tokens=True).strip()

    # ------------------------------------------------------------------------------------------------- scoring
    @abstractmethod
    def oracle(self) -> Callable[[str, str], Any] | None:
        """The oracle: `score(context, completion) -> alignpipe.oracle.scoring.CompletionScore` (violations and
        characters: lower violations per character is better), or None when the task has none (then candidates
        are scored by the reward model and a judge)."""

    def has_oracle(self) -> bool:
        """Whether an oracle judges completions (the `oracle` reward term, the oracle check of a trained policy);
        without one a stage checks itself with the reward against the reference."""
        return self.oracle() is not None

    def summarize(self, scores, seed: int = 0) -> dict[str, float]:
        """The task's own summary of a policy's oracle scores (one per prompt) beside the oracle's per-character
        one (`alignpipe.oracle.metrics.summarize`), e.g. an accuracy with its interval; none by default."""
        return {}

    def oracle_labels(self) -> dict[str, str]:
        """What evaluate's two oracle columns measure, as its report names them: `violations_per_char` (the mean
        over non-empty samples) and `zero_violation_frac` (over all samples); the PEP8 oracle's names by default."""
        from alignpipe.reports.evaluation import ORACLE_LABELS

        return dict(ORACLE_LABELS)

    @abstractmethod
    def gate(self) -> tuple[str, bool]:
        """(metric, higher is better): the per-candidate key of evaluate's report that picks the best candidate and
        gates register."""

    @abstractmethod
    def describe(self) -> dict[str, str]:
        """`scorer` (what scores a candidate's samples) and `guard_score` (what the reward-hacking guard compares the
        optimised reward's gain with), for reports."""


    # ---------------------------------------------------------------------------------------------- pretrain
    def pretrain_objectives(self) -> tuple[str, ...]:
        """The PHF objectives pretrain can train this task with (all six: its documents carry oracle scores)."""
        from alignpipe.algos.phf import OBJECTIVES

        return OBJECTIVES

    def pretrain_needs_init_model(self) -> bool:
        """Whether pretrain must continue a given model (`pretrain.init_model`) rather than train one from scratch."""
        return False

    def train_tokenizer(self, texts, cfg):
        """The tokenizer pretrain trains on the corpus `texts` when it continues no model (`cfg`: pretrain's
        config): a byte-level BPE with EOS, PAD and the control tokens."""
        from alignpipe.lm.tokenizers import train_tokenizer

        return train_tokenizer(texts, cfg.vocab_size, indent=cfg.tokenizer_indent)

    def new_model(self, tok, cfg):
        """The model pretrain trains from scratch (`cfg`: pretrain's config): a GPT-2."""
        from alignpipe.lm.models import build_model

        return build_model(tok, cfg.n_embd, cfg.n_layer, cfg.n_head, max(cfg.seq_len, 256))

    def check_pretrain_rows(self, rows: list[dict], where) -> None:
        """A DataError naming the row when a train.jsonl row (`where`: the file) lacks what `pretrain_documents`
        reads: `text`, `line_violations`, `violations_per_char`."""
        for i, row in enumerate(rows):
            for key, kind in (("text", str), ("line_violations", list), ("violations_per_char", (int, float))):
                if not isinstance(row.get(key), kind):
                    what = getattr(kind, "__name__", "number")
                    raise DataError(f"{where}:{i + 1}", f"field {key!r} missing or not a {what}")

    def pretrain_documents(self, rows: list[dict], tok, where) -> list[tuple[float, list]]:
        """(document score, segments) of each train.jsonl row (`where`: the file, for errors): the row's
        `violations_per_char` (what `filter` keeps or drops) and `alignpipe.algos.phf.split_segments` of its `text`
        by its `line_violations`."""
        from alignpipe.algos.phf import split_segments

        self.check_pretrain_rows(rows, where)
        return [(r["violations_per_char"], split_segments(r["text"], r["line_violations"])) for r in rows]


def write_manifest(out_dir: Path, task: Task, manifest: dict[str, Any]) -> None:
    """MANIFEST.json of a data directory, recording `task` for the later stages (`task_of`)."""
    from alignpipe.core.io import write_json

    write_json(Path(out_dir) / MANIFEST_FILE, {"task": str(task), **manifest})


_LOADED: dict[str, Task] = {}


def get_task(spec: str, key: str = "data.task") -> Task:
    """The task `spec` names: a built-in name or `package.module:Name` (a `Task` subclass); loaded once. A
    ConfigError in one line when it cannot be imported, is not a Task or lacks a method."""
    if spec not in _LOADED:
        _LOADED[spec] = load_task(spec, key)
    return _LOADED[spec]


def builtin_tasks() -> dict[str, type[Task]]:
    """The built-in tasks by name."""
    from alignpipe.tasks.arith import Arith
    from alignpipe.tasks.chat import Chat
    from alignpipe.tasks.pep8 import Pep8

    return {"pep8": Pep8, "chat": Chat, "arith": Arith}


def load_task(spec: str, key: str = "data.task") -> Task:
    """A fresh instance of the task `spec` names (see `get_task`)."""
    builtin = builtin_tasks()
    module_name, colon, attr = spec.partition(":")
    if spec in builtin:
        cls = builtin[spec]
    elif not colon or not module_name or not attr:
        raise ConfigError(key, f"unknown task {spec!r}: use {', '.join(builtin)} or package.module:Name")
    else:
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(key, f"cannot load task {spec!r}: {e}") from None
    if not (inspect.isclass(cls) and issubclass(cls, Task)):
        raise ConfigError(key, f"task {spec!r} must be a subclass of alignpipe.tasks.Task")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise ConfigError(key, f"task {spec!r} lacks method {missing[0]}() of alignpipe.tasks.Task "
                          f"(missing: {', '.join(missing)})")
    task = cls()
    task.name = spec
    return task


def task_of(data_dir: str | Path | None) -> Task:
    """The task a data directory was built for (its MANIFEST.json's `task`; pep8 when absent: the PEP8 corpus)."""
    path = Path(data_dir) / MANIFEST_FILE if data_dir is not None else None
    if path is None or not path.is_file():
        return get_task(DEFAULT_TASK)
    return get_task(json.loads(path.read_text(encoding="utf-8")).get("task", DEFAULT_TASK))


def split_of(key: str, cfg) -> str:
    """Stable split of a file (or row) from a hash of its key (`cfg`: the data stage's config)."""
    from alignpipe.core.hashing import hash01

    h = hash01(key, cfg.seed)
    return "test" if h < cfg.test_frac else "val" if h < cfg.test_frac + cfg.val_frac else "train"
