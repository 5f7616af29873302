"""Build the dataset: the task's own data (`Task.build_data`; the PEP8 task's: the Python corpus of the running
interpreter's standard library or `--corpus`, `alignpipe.tasks.pep8`), or a preference/prompt dataset of any task
read through `datasets` (`--dataset PATH_OR_ID`, see `build_from_dataset`).

With `data.dataset` (`alignpipe data build --dataset PATH_OR_ID [--split S]`): a local JSONL/JSON/Parquet file,
a folder in the Hugging Face layout, or a hub id, in TRL's standard form (`prompt`/`chosen`/`rejected` strings) or
conversational form (lists of `{"role", "content"}` messages; ShareGPT `from`/`value` messages and implicit prompts
are converted with TRL's `maybe_convert_to_chatml` / `maybe_extract_prompt`). Rows are split train/val/test by a
hash of their prompt. Written: `prefs.jsonl` (train pairs) and `heldout.jsonl` (val + test pairs), the label
stage's two files, so reward and dpo take `--prefs data`; `prompts.jsonl` (test prompts, with the chosen answer as
`reference`) and `train_prompts.jsonl`; `train/val/test.jsonl` with `text` (the prompt and chosen answer's contents)
and, for conversations, `messages` (the prompt + chosen turns, for consumers that apply a chat template). A prompt
dataset (no chosen/rejected) gives only the prompt files. MANIFEST.json records `task` (`data.task`): later stages
read it (`alignpipe.tasks.task_of`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from alignpipe.core.config import MAX_LINES, MAX_ROWS, MAX_SEED, StageConfig, field
from alignpipe.core.hashing import hash01
from alignpipe.core.errors import DataError
from alignpipe.core.io import is_messages
from alignpipe.tasks.base import DEFAULT_TASK, builtin_tasks, get_task, split_of, write_manifest
from alignpipe.stages import Input

INPUTS = (Input("corpus", None, "optional user corpus JSONL with a 'text' field (default: the stdlib)", False),)
# Input files checked by the validate stage's validators (the `validate` params section's limits) before any work.
CHECKED_INPUTS = {"corpus": "corpus"}
# What it writes passes the same validators before it is published: data build accepts only what validate accepts.
CHECKED_OUTPUTS = ("corpus", "prefs")
METRICS = ("n_train_chunks", "n_val_chunks", "n_test_chunks", "n_prompts", "corpus_mb")  # pep8 corpus: also
# mean_violations_per_char; a --dataset build: also n_pairs, n_heldout_pairs
# The few metrics `dvc metrics show` lists (metrics_headline.json; fnmatch patterns); metrics.json has all.
HEADLINE = ("n_train_chunks", "n_prompts", "mean_violations_per_char")

# File suffix -> the `datasets` builder that reads it.
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
PAIR_KEYS = ("prompt", "chosen", "rejected")
SCORE_KEYS = ("score_chosen", "score_rejected")


@dataclass(frozen=True)
class Config(StageConfig):
    SECTION: ClassVar[str] = "data"

    source_dir: str = field("", "directory of .py files to use (default: the running interpreter's stdlib)")
    stdlib_subdir: str = field("", "only this package of the stdlib (e.g. 'email': a small corpus for tests)")
    max_chunk_lines: int = field(64, "pack top-level statements into chunks of at most this many lines",
                                 ge=4, le=MAX_LINES)
    val_frac: float = field(0.05, "fraction of files in the validation split (by path hash)", ge=0, lt=0.5)
    test_frac: float = field(0.05, "fraction of files in the test split (by path hash); prompts come from it",
                             gt=0, lt=0.5)
    prompt_lines: int = field(8, "lines of code shown to the model in each held-out prompt", ge=1, le=MAX_LINES)
    max_context_lines: int = field(200, "skip prompts whose enclosing top-level statement is longer than this",
                                   ge=1, le=MAX_LINES)
    n_prompts: int = field(1024, "number of held-out prompts (fewer if the test split has fewer candidates)",
                           ge=1, le=MAX_ROWS)
    n_train_prompts: int = field(4096, "number of training prompts (train split) for label, dpo and ppo",
                                 ge=1, le=MAX_ROWS)
    seed: int = field(0, "salt of the split, prompt-selection and corruption hashes", ge=0, le=MAX_SEED)
    corrupt_frac: float = field(0.0, "fraction of the training chunks rewritten with style violations (PHF's mix; "
                                "the task's `build_data` does it: pep8 rewrites indentation, spacing, line length, "
                                "blank lines, trailing whitespace, names); val/test stay as they are", ge=0, le=1)
    task: str = field(DEFAULT_TASK, f"the task the data is for: {' or '.join(builtin_tasks())}, or a plug-in as "
                      "package.module:Name (alignpipe.tasks, docs/tasks.md); recorded in MANIFEST.json, read by later "
                      "stages")
    dataset: str = field("", "preference or prompt dataset read through `datasets`: a JSONL/JSON/Parquet file, a "
                         "folder in HF layout or a hub id (empty: the PEP8 corpus)")
    split: str = field("train", "split of `dataset` to read (it is then split train/val/test by prompt hash)",
                       nonempty=True)
    # Generated verifiable tasks (arith: alignpipe.tasks.arith)
    n_conversations: int = field(8000, "arith: conversations generated from `seed` (train/val/test by question)",
                                 ge=1, le=MAX_ROWS)
    max_operand: int = field(99, "arith: operands drawn from 0..max_operand (the difficulty: digits and carries)",
                             ge=1, le=MAX_ROWS)
    wrong_frac: float = field(0.3, "arith: fraction of the corpus' answers that are plausible wrong ones (off by "
                              "one or ten, a dropped carry, swapped digits), tagged by the oracle", ge=0, le=1)

    def __post_init__(self):
        super().__post_init__()
        get_task(self.task)  # a ConfigError in one line: unknown, not importable, or lacking a method


def run(cfg: Config, inputs: dict[str, Path | None], out_dir: Path) -> dict[str, float]:
    """Build train/val/test chunks, prompts and MANIFEST.json into `out_dir` (from `data.dataset` when set)."""
    if cfg.dataset:
        if inputs.get("corpus") is not None:
            from alignpipe.core.errors import ConfigError

            raise ConfigError("--corpus", "give either --corpus (a PEP8 code corpus) or --dataset, not both")
        if cfg.corrupt_frac:
            from alignpipe.core.errors import ConfigError

            raise ConfigError("data.corrupt_frac", "rewrites the task's own corpus build, not a --dataset: set it to 0")
        return build_from_dataset(cfg, out_dir)
    return get_task(cfg.task).build_data(cfg, inputs, out_dir)


# ------------------------------------------------------------------------------------- --dataset: any task's data

def _plain(value):
    """A `datasets` value as plain JSON: messages lose the None fields Arrow adds for keys other rows have."""
    if isinstance(value, list):
        return [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in value]
    return value


def load_dataset_rows(spec: str, split: str) -> list[dict]:
    """The rows of split `split` of a dataset read with `datasets.load_dataset` (a file, an HF-layout folder or a
    hub id), with ShareGPT messages converted to role/content and implicit prompts extracted (TRL's helpers)."""
    import datasets
    from trl.data_utils import maybe_convert_to_chatml, maybe_extract_prompt

    path = Path(spec)
    if path.is_file() and path.suffix not in BUILDERS:
        raise DataError(spec, f"unknown file type {path.suffix!r}: expected {', '.join(BUILDERS)} or a folder")
    try:
        if path.is_file():
            ds = datasets.load_dataset(BUILDERS[path.suffix], data_files=str(path), split=split)  # one split: train
        else:
            ds = datasets.load_dataset(spec, split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError,
            datasets.exceptions.DatasetGenerationError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(spec, f"cannot read split {split!r} with datasets: {reason}") from None
    rows = []
    for i, row in enumerate(ds):
        wrong = next((k for k in (*PAIR_KEYS, "messages", "conversations") if row.get(k) is not None
                      and not isinstance(row[k], (str, list))), None)
        if wrong is not None:  # TRL's helpers index into these: an object would be a KeyError deep inside them
            raise DataError(f"{spec}[{split}][{i}]", f"field {wrong!r} must be a string or a list of role/content "
                            f"messages, got {type(row[wrong]).__name__}")
        row = maybe_extract_prompt(maybe_convert_to_chatml({k: _plain(v) for k, v in row.items()}))
        rows.append(row)
        if "prompt" not in row:
            raise DataError(f"{spec}[{split}][{i}]", "no 'prompt' column (nor chosen/rejected with a shared prompt): "
                            f"columns are {', '.join(sorted(row))}")
    if not rows:
        raise DataError(spec, f"split {split!r} has no rows")
    return rows


def _check_row(row: dict, where: str, pairs: bool) -> dict:
    """The pipeline's columns of one row: prompt (+ chosen, rejected, scores), all strings or all messages."""
    keys = PAIR_KEYS if pairs else ("prompt",)
    conversational = isinstance(row.get("prompt"), list)
    for key in keys:
        ok = is_messages(row.get(key)) if conversational else isinstance(row.get(key), str)
        if not ok:
            like = ", like the prompt" if key != "prompt" else ""
            form = f"a list of role/content messages with string contents{like}" if conversational else "a string"
            raise DataError(where, f"field {key!r} must be {form}, got {type(row.get(key)).__name__}")
    return {k: row[k] for k in (*keys, *(SCORE_KEYS if pairs else ())) if row.get(k) is not None}


def _text(value) -> str:
    """The text of a field: the string, or the messages' contents one after the other."""
    return "\n\n".join(m["content"] for m in value) if isinstance(value, list) else value


def build_from_dataset(cfg: Config, out_dir: Path) -> dict[str, float]:
    """Preference pairs and/or prompts of `cfg.dataset`, split by prompt hash, as the pipeline's data files."""
    import json

    from alignpipe.core.io import HELDOUT_FILE, PREFS_FILE, write_jsonl

    raw = load_dataset_rows(cfg.dataset, cfg.split)
    pairs = all(k in raw[0] for k in ("chosen", "rejected"))
    rows = [_check_row(r, f"{cfg.dataset}[{cfg.split}][{i}]", pairs) for i, r in enumerate(raw)]
    forms = {is_messages(r["prompt"]) for r in rows}
    if len(forms) > 1:
        raise DataError(cfg.dataset, "rows mix string prompts and message lists: use one form")
    conversational = forms == {True}
    task = get_task(cfg.task)
    task.check_dataset(conversational, cfg.dataset)

    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    prompts: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    seen: set[str] = set()
    for i, row in enumerate(rows):
        key = json.dumps(row["prompt"], sort_keys=True, ensure_ascii=False)
        split = split_of(key, cfg)
        splits[split].append(row)
        if key not in seen:  # one prompt row per distinct prompt
            seen.add(key)
            ref = {"reference": _text(row["chosen"])} if pairs else {}
            prompts[split].append({"prompt": row["prompt"], **ref, "source": f"{cfg.split}:{i}"})

    def pick(items: list[dict], n: int) -> list[dict]:
        return sorted(items, key=lambda r: hash01(r["source"], cfg.seed + 1))[:n]

    def corpus(items: list[dict]) -> list[dict]:
        return [{"text": _text(r["prompt"]) + "\n\n" + _text(r["chosen"]),
                 **({"messages": r["prompt"] + r["chosen"]} if conversational else {})} for r in items]

    files = {"prompts.jsonl": pick(prompts["test"], cfg.n_prompts),
             "train_prompts.jsonl": pick(prompts["train"], cfg.n_train_prompts)}
    if pairs:
        files.update({PREFS_FILE: splits["train"], HELDOUT_FILE: splits["val"] + splits["test"],
                      **{f"{name}.jsonl": corpus(items) for name, items in splits.items()}})
    empty = [name for name, items in files.items() if not items and not (name == "val.jsonl" and cfg.val_frac == 0)]
    if empty:
        raise DataError(cfg.dataset, f"{len(rows)} rows give no rows for {', '.join(sorted(empty))}: use more rows "
                        "or larger data.val_frac/test_frac")
    for name, items in files.items():
        write_jsonl(out_dir / name, items)
    manifest = {
        "source": cfg.dataset,
        "split": cfg.split,
        "form": "conversational" if conversational else "standard",
        "kind": "preference" if pairs else "prompt",
        "config": cfg.to_dict(),
        "counts": {name: len(items) for name, items in files.items()},
        "sha256": {name: hashlib.sha256((out_dir / name).read_bytes()).hexdigest() for name in sorted(files)},
    }
    write_manifest(out_dir, task, manifest)
    chars = sum(len(r["text"]) for name in ("train.jsonl", "val.jsonl", "test.jsonl") for r in files.get(name, []))
    return {
        "n_train_chunks": len(files.get("train.jsonl", [])), "n_val_chunks": len(files.get("val.jsonl", [])),
        "n_test_chunks": len(files.get("test.jsonl", [])), "n_prompts": len(files["prompts.jsonl"]),
        "n_train_prompts": len(files["train_prompts.jsonl"]), "corpus_mb": round(chars / 1e6, 3),
        "n_pairs": len(files.get(PREFS_FILE, [])), "n_heldout_pairs": len(files.get(HELDOUT_FILE, [])),
    }
