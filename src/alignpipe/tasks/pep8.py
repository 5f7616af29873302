"""The PEP8 task (the default) of Korbak et al. 2023 (PHF): write Python code that pycodestyle accepts.

- data: the running interpreter's standard library (or a user corpus, `--corpus`: JSONL with "text"), read in sorted
  order, split train/val/test by a hash of the file's path, cut into chunks at top-level statement boundaries and
  scored with the pycodestyle oracle (violations per character, and per line so later stages can score segments).
  Held-out prompts (code prefixes whose next line starts a one-line statement) come from the test split, training
  prompts (for label, dpo, ppo) from the train split. `data.dataset` builds from a preference dataset instead.
- a prompt is a string of Python code; the policy sees it raw (or between the control tokens of conditional
  training, `PolicyMeta.format_prompt`);
- a completion is one logical line (`LogicalLine`): a prompt is code that ends on a non-blank line (no trailing
  newline); the completion starts with the newline and ends at the end of the first non-blank logical line
  (brackets closed), or at `max_new_tokens`. The first sampled token is restricted to tokens that start a new line
  (`\n...`): the unit is "the next line", and a barely trained model would otherwise continue the prompt's line;
- the pycodestyle oracle scores it (`alignpipe.oracle.scoring.score_completion`: violations per character, lower is
  better); the gate is `violations_per_char`, lower; the guard compares the reward model's gain with the oracle's.
"""

from __future__ import annotations

import ast
import hashlib
import io
import statistics
import sys
import sysconfig
import tokenize
from pathlib import Path
from typing import Any, Iterator

from alignpipe.core.errors import DataError
from alignpipe.core.hashing import hash01
from alignpipe.lm.policy import CompletionUnit, finish_completion, newline_ids
from alignpipe.tasks.base import Task, split_of


class Pep8(Task):
    """Python code, one logical line per completion, scored by the pycodestyle oracle."""

    def __init__(self):
        self.unit = LogicalLine()

    def conversational(self) -> bool:
        return False

    def build_data(self, cfg, inputs: dict[str, Path | None], out_dir: Path) -> dict[str, float]:
        """The corpus build (module docstring); its MANIFEST.json records no `task` (pep8 is the default)."""
        return build_corpus(cfg, inputs, out_dir)

    def format_prompt(self, prompt: Any, tok, meta=None) -> str:
        """The policy's own formatting of the code (`PolicyMeta.format_prompt`: control tokens), or the code."""
        return meta.format_prompt(prompt) if meta is not None else prompt

    def completion_unit(self) -> CompletionUnit:
        return self.unit

    def first_token_ids(self, tok) -> list[int]:
        return self.unit.first_token_ids(tok)

    def completion_done(self, tok, new_ids: list[int]) -> bool:
        return self.unit.done(tok, new_ids)

    def finish_completion(self, tok, meta, new_ids: list[int]) -> str:
        """Up to the end of the line, whitespace kept (`alignpipe.lm.policy.finish_completion`)."""
        return finish_completion(tok, meta, new_ids, self.unit)[1]

    def oracle(self):
        from alignpipe.oracle.scoring import score_completion

        return score_completion

    def gate(self) -> tuple[str, bool]:
        return "violations_per_char", False

    def describe(self) -> dict[str, str]:
        return {"scorer": "pycodestyle oracle: violations per character (Korbak et al. 2023)",
                "guard_score": "oracle violations/char"}


# ---------------------------------------------------------------------------------- the unit: one logical line

class LogicalLine(CompletionUnit):
    """A completion is the next logical line of code (module docstring)."""

    def __init__(self):
        self._line_ids: dict[int, tuple[Any, set[int]]] = {}

    def line_ids(self, tok) -> set[int]:
        """The tokens holding a newline, computed once per tokenizer (kept alive with it)."""
        if id(tok) not in self._line_ids:
            self._line_ids[id(tok)] = (tok, newline_ids(tok)[0])
        return self._line_ids[id(tok)][1]

    def first_token_ids(self, tok) -> list[int]:
        """Tokens that start a new line."""
        return newline_ids(tok)[1]

    def stopping_criteria(self, tok, prompt_len: int) -> list:
        """Stop each row once its completion holds a finished logical line (checked when a newline is produced)."""
        import torch
        from transformers import StoppingCriteria

        line_ids = self.line_ids(tok)

        class _LineDone(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
                if not any(int(x) in line_ids for x in input_ids[:, -1]):
                    return done
                for row in range(input_ids.shape[0]):
                    if int(input_ids[row, -1]) in line_ids:
                        text = tok.decode(input_ids[row, prompt_len:], skip_special_tokens=True)
                        done[row] = line_complete(text)
                return done

        return [_LineDone()]

    def done(self, tok, new_ids: list[int]) -> bool:
        """The completion so far (its last token just drawn) holds a finished logical line: the ONNX sampler's
        check, the stopping criterion's."""
        return new_ids[-1] in self.line_ids(tok) and line_complete(tok.decode(new_ids, skip_special_tokens=True))

    def cut(self, tok, meta, ids: list[int]) -> tuple[list[int], bool]:
        """(the generated ids up to the token that finished the line, or EOS, excluded, without padding; whether
        the row ended there: False when it ran out of tokens, i.e. reached `max_new_tokens`, mid-line)."""
        out: list[int] = []
        for i in ids:
            if i == tok.eos_token_id or i == tok.pad_token_id:
                return out, True
            out.append(i)
            if self.ended_by_unit(tok, meta, out):
                return out, True
        return out, False

    def ended_by_unit(self, tok, meta, ids: list[int]) -> bool:
        """Whether the last of `ids` finished the line."""
        return bool(ids) and "\n" in tok.decode([ids[-1]]) and line_complete(
            meta.clean(tok.decode(ids, skip_special_tokens=True)))

    def trim(self, text: str) -> str:
        return cut_completion(text)


def line_complete(text: str) -> bool:
    """True when `text` (a completion starting with a newline) holds a finished non-blank logical line
    followed by a newline."""
    lines = text.lstrip("\n").split("\n")
    return any(_closed("\n".join(lines[:end])) for end in range(1, len(lines)) if "\n".join(lines[:end]).strip())


def cut_completion(text: str) -> str:
    """The completion up to the end of its first finished non-blank logical line (without the newline after)."""
    lead = len(text) - len(text.lstrip("\n"))
    lines = text[lead:].split("\n")
    for end in range(1, len(lines) + 1):
        candidate = "\n".join(lines[:end])
        if candidate.strip() and _closed(candidate):
            return text[:lead] + candidate
    return text


def _closed(code: str) -> bool:
    """Whether the tokenizer sees no open bracket or string at the end of `code`."""
    try:
        for _ in tokenize.generate_tokens(io.StringIO(code.strip("\n").lstrip() + "\n").readline):
            pass
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return False
    return True


# ----------------------------------------------------------------------------------------------- the corpus build

# Config keys of other tasks' builds (--dataset, arith), left out of the PEP8 corpus build's MANIFEST (it stays
# as it was before them).
DATASET_KEYS = ("task", "dataset", "split", "n_conversations", "max_operand", "wrong_frac")
# Path parts that mark tests or vendored/generated trees; they are not hand-written library code.
EXCLUDED_PARTS = ("test", "tests", "idle_test", "site-packages", "_bundled", "__pycache__", "__phello__")
# Generated files whose tables would dominate the violation counts (codec tables, pydoc topics, stringprep...).
GENERATED_MARKERS = ("generated by", "automatically generated", "do not edit", "decoding_table = (")


def stdlib_files(root: Path) -> Iterator[tuple[str, str]]:
    """(relative path, text) of the hand-written UTF-8 .py files under `root`, in sorted order."""
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_PARTS for part in rel.parts[:-1]) or rel.name.startswith(("test_", "_sysconfigdata")):
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        head = "\n".join(text.splitlines()[:15]).lower()
        if any(marker in head for marker in GENERATED_MARKERS) or "decoding_table = (" in text:
            continue
        if text.strip():
            yield rel.as_posix(), text


def _units(nodes: list[ast.stmt], lo: int, hi: int, max_lines: int) -> list[tuple[int, int]]:
    """Line ranges [start, end] (1-based, inclusive) covering lines lo..hi, cut at statement boundaries.

    Comments and blank lines before a statement belong to it. A statement longer than `max_lines` with a
    body is cut at its body's statement boundaries (its header lines go with the first body statement).
    """
    starts = [min([n.lineno] + [d.lineno for d in getattr(n, "decorator_list", [])]) for n in nodes]
    out: list[tuple[int, int]] = []
    for i, node in enumerate(nodes):
        start = lo if i == 0 else out[-1][1] + 1
        end = hi if i == len(nodes) - 1 else starts[i + 1] - 1
        body = getattr(node, "body", None)
        if end - start + 1 > max_lines and isinstance(body, list) and body and body[0].lineno > node.lineno:
            inner = [n for n in body if isinstance(n, ast.stmt)]
            tail = [n for n in ("orelse", "finalbody") if getattr(node, n, None)]
            if inner and not tail:
                out.extend(_units(inner, start, end, max_lines))
                continue
        out.append((start, end))
    return out


def chunk_ranges(text: str, max_lines: int) -> list[tuple[int, int]]:
    """Chunks of a module as line ranges: top-level statements packed greedily up to `max_lines` lines."""
    n_lines = len(text.splitlines())
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    if not tree.body:
        return []
    chunks: list[tuple[int, int]] = []
    for start, end in _units(tree.body, 1, n_lines, max_lines):
        if chunks and end - chunks[-1][0] + 1 <= max_lines:
            chunks[-1] = (chunks[-1][0], end)
        else:
            chunks.append((start, end))
    return chunks


def _prompt_candidates(rel: str, text: str, lines: list[str], cfg) -> Iterator[dict]:
    """Held-out prompts: the code before a line that starts a one-line statement, and that line as reference."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    seen: set[int] = set()  # a one-line compound statement (`if x: y()`) holds two statements on one line
    for top in tree.body:
        top_start = min([top.lineno] + [d.lineno for d in getattr(top, "decorator_list", [])])
        if top.end_lineno - top_start + 1 > cfg.max_context_lines:
            continue
        for node in ast.walk(top):
            if not isinstance(node, ast.stmt) or node.lineno != node.end_lineno or node is top:
                continue
            i = node.lineno - 1  # 0-based index of the reference line
            if i in seen or i - 1 < top_start - 1 or not lines[i - 1].strip() or not lines[i].strip():
                continue
            seen.add(i)
            context = "\n".join(lines[top_start - 1:i])
            prompt = "\n".join(lines[max(top_start - 1, i - cfg.prompt_lines):i])
            yield {"prompt": prompt, "context": context, "reference": "\n" + lines[i], "source": f"{rel}:{i + 1}"}


def _documents(cfg, corpus: Path | None) -> Iterator[tuple[str, str]]:
    if corpus is not None:
        from alignpipe.core.io import iter_jsonl

        for idx, row in enumerate(iter_jsonl(corpus)):
            if not isinstance(row.get("text"), str) or not row["text"].strip():
                raise DataError(f"{corpus}:{idx + 1}", "field 'text' must be a non-empty string")
            yield str(row.get("source", f"row{idx:07d}")), row["text"]
        return
    root = Path(cfg.source_dir) if cfg.source_dir else Path(sysconfig.get_paths()["stdlib"]) / cfg.stdlib_subdir
    if not root.is_dir():
        from alignpipe.core.errors import ConfigError

        raise ConfigError("data.source_dir" if cfg.source_dir else "data.stdlib_subdir", f"{root} is not a directory")
    yield from stdlib_files(root)


def build_corpus(cfg, inputs: dict[str, Path | None], out_dir: Path) -> dict[str, float]:
    """Build train/val/test chunks, prompts and MANIFEST.json of the PEP8 corpus into `out_dir`."""
    from tqdm import tqdm

    from alignpipe.core.io import write_json, write_jsonl
    from alignpipe.oracle.scoring import line_violations

    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    candidates: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    n_files = 0
    docs = list(_documents(cfg, inputs.get("corpus")))
    kinds: dict[str, int] = {}
    for rel, text in tqdm(docs, desc="data: scoring files", unit="file", mininterval=2):
        lines = text.splitlines()
        per_line = line_violations(text)
        split = split_of(rel, cfg)
        ranges = chunk_ranges(text, cfg.max_chunk_lines) if inputs.get("corpus") is None else [(1, len(lines))]
        n_files += bool(ranges)
        frac = cfg.corrupt_frac if split == "train" else 0.0
        styled = corrupt_file(lines, ranges, rel, frac, cfg.seed)
        for start, end in ranges:
            chunk = "\n".join(lines[start - 1:end]) + "\n"
            if not chunk.strip():
                continue
            counts, habits = per_line[start - 1:end], []
            if start in styled:  # the rewritten chunk, scored in its rewritten file (`corrupt_file`)
                chunk, counts, habits = styled[start]
                for habit in habits:
                    kinds[habit] = kinds.get(habit, 0) + 1
            splits[split].append({
                "text": chunk, "source": rel, "start_line": start, "n_chars": len(chunk),
                "violations": sum(counts), "violations_per_char": sum(counts) / len(chunk),
                "line_violations": counts, **({"corruption": habits} if habits else {}),
            })
        if split != "val":
            candidates[split].extend(_prompt_candidates(rel, text, lines, cfg))

    def pick(rows: list[dict], n: int) -> list[dict]:
        return sorted(sorted(rows, key=lambda r: hash01(r["source"], cfg.seed + 1))[:n], key=lambda r: r["source"])

    prompts = pick(candidates["test"], cfg.n_prompts)
    files = {f"{name}.jsonl": rows for name, rows in splits.items()}
    files["prompts.jsonl"] = prompts
    files["train_prompts.jsonl"] = pick(candidates["train"], cfg.n_train_prompts)
    empty = [name for name, rows in files.items() if not rows and not (name == "val.jsonl" and cfg.val_frac == 0)]
    if empty:
        raise DataError(str(inputs.get("corpus") or cfg.source_dir or "stdlib"), f"{len(docs)} files give no rows "
                        f"for {', '.join(empty)}: use more source files or larger data.val_frac/test_frac")
    for name, rows in files.items():
        write_jsonl(out_dir / name, rows)
    scores = [r["violations_per_char"] for r in splits["train"]]
    total_chars = sum(r["n_chars"] for rows in splits.values() for r in rows)
    n_corrupted = sum("corruption" in r for r in splits["train"])
    left_out = DATASET_KEYS + (() if cfg.corrupt_frac else ("corrupt_frac",))  # 0: byte-identical to before it
    manifest = {
        "python_version": sys.version.split()[0],
        "source": str(inputs.get("corpus") or cfg.source_dir or "stdlib"),
        "config": {k: v for k, v in cfg.to_dict().items() if k not in left_out},
        **({"corruption": {
            "what": "train chunks rewritten with style violations (alignpipe.tasks.pep8_style), chosen by a hash of "
                    "source:start_line and data.seed; their rows hold `corruption` (the habits) and are scored as "
                    "rewritten; val/test chunks are not rewritten",
            "corrupt_frac": cfg.corrupt_frac, "n_corrupted": n_corrupted,
            "corrupted_frac": n_corrupted / max(len(splits["train"]), 1),
            "habits": dict(sorted(kinds.items()))}} if cfg.corrupt_frac else {}),
        "n_files": n_files,
        "counts": {name: len(rows) for name, rows in files.items()},
        "chars": total_chars,
        "train_scores": {
            "mean_violations_per_char": statistics.fmean(scores) if scores else 0.0,
            "median_violations_per_char": statistics.median(scores) if scores else 0.0,
            "zero_violation_frac": sum(s == 0 for s in scores) / max(len(scores), 1),
        },
        "sha256": {name: hashlib.sha256((out_dir / name).read_bytes()).hexdigest() for name in sorted(files)},
    }
    write_json(out_dir / "MANIFEST.json", manifest)
    return {
        "n_train_chunks": len(splits["train"]), "n_val_chunks": len(splits["val"]),
        "n_test_chunks": len(splits["test"]), "n_prompts": len(prompts),
        "n_train_prompts": len(files["train_prompts.jsonl"]),
        "corpus_mb": round(total_chars / 1e6, 3),
        "mean_violations_per_char": round(manifest["train_scores"]["mean_violations_per_char"], 8),
        **({"n_corrupted_chunks": n_corrupted} if cfg.corrupt_frac else {}),
    }


def corrupt_file(lines: list[str], ranges: list[tuple[int, int]], rel: str, frac: float,
                 seed: int) -> dict[int, tuple[str, list[int], list[str]]]:
    """The chunks of one file that `data.corrupt_frac` rewrites (`alignpipe.tasks.pep8_style`), by start line:
    (chunk text, violations per line, habits). The rewritten chunks are put back into the file and the file is scored
    again, so each is scored in its context as every chunk is; the other chunks keep the original file's scores. A
    rewrite that would stop a parsing file from parsing (pycodestyle then stops checking it) is left out."""
    from alignpipe.oracle.scoring import line_violations
    from alignpipe.tasks.pep8_style import is_corrupted

    chosen = [(s, e) for s, e in ranges if is_corrupted(f"{rel}:{s}", frac, seed)]
    if not chosen:
        return {}
    out, placed = _rewrite(lines, chosen, rel, seed)
    if not _parses(out) and _parses(lines):
        chosen = [c for c in chosen if _parses(_rewrite(lines, [c], rel, seed)[0])]
        out, placed = _rewrite(lines, chosen, rel, seed)
    per_line = line_violations("\n".join(out) + "\n")
    return {start: ("\n".join(out[s - 1:e]) + "\n", per_line[s - 1:e], habits)
            for start, (s, e, habits) in placed.items()}


def _rewrite(lines: list[str], chosen: list[tuple[int, int]], rel: str,
             seed: int) -> tuple[list[str], dict[int, tuple[int, int, list[str]]]]:
    """The file's lines with the `chosen` chunks rewritten, and start -> (new start, new end, habits)."""
    from alignpipe.tasks.pep8_style import corrupt

    out: list[str] = []
    placed: dict[int, tuple[int, int, list[str]]] = {}
    done = 0  # original lines copied so far
    for start, end in chosen:
        out.extend(lines[done:start - 1])
        new, habits = corrupt(lines[start - 1:end], f"{rel}:{start}", seed)
        placed[start] = (len(out) + 1, len(out) + len(new), habits)
        out.extend(new)
        done = end
    out.extend(lines[done:])
    return out, placed


def _parses(lines: list[str]) -> bool:
    try:
        ast.parse("\n".join(lines) + "\n")
    except (SyntaxError, ValueError):
        return False
    return True
