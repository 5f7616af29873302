"""Style corruption of PEP8 training chunks: PHF's mix (Korbak et al. 2023 trained on code that imitates plenty of
violations; the stdlib has few), made here by rewriting a known fraction of clean chunks the way sloppy code looks.

A chunk is chosen by a hash of its key (`is_corrupted`: the same chunks on every machine, and a larger fraction holds
a smaller one's chunks); its rewrite is drawn from a `random.Random` seeded by the same key: one to three habits
(`KINDS`), each applied to a share of the lines it can touch. The rewrites keep the code's tokens, so the chunk still
reads as the same program; what changes is what pycodestyle checks (indentation widths, operator spacing, long lines,
blank-line rules, trailing whitespace, ambiguous names, comparisons to None).
"""

from __future__ import annotations

import io
import keyword
import random
import re
import tokenize
from typing import Callable

from alignpipe.core.hashing import hash01

SALT = "corrupt:"  # keeps the corruption draw independent of the split and prompt-selection hashes
MAX_LINE = 79  # pycodestyle's default max-line-length: a joined statement longer than this is an E501


def is_corrupted(key: str, frac: float, seed: int) -> bool:
    """Whether the chunk named `key` is rewritten at corruption fraction `frac`."""
    return frac > 0 and hash01(SALT + key, seed) < frac


def corrupt(lines: list[str], key: str, seed: int) -> tuple[list[str], list[str]]:
    """(the rewritten lines, the habits applied, in `KINDS` order) of the chunk `lines` named `key`. At least one
    habit changes the chunk (trailing whitespace applies to any chunk with a non-blank line)."""
    rng = random.Random(f"{SALT}{seed}:{key}")  # a str seed: sha512 of it, the same in every process
    wanted = set(rng.sample(list(KINDS), rng.randint(1, 3)))
    applied: list[str] = []
    for name, habit in KINDS.items():
        if name in wanted:
            new = habit(lines, rng)
            if new != lines:
                lines = new
                applied.append(name)
    if not applied:
        new = trailing_whitespace(lines, rng)
        if new != lines:
            lines, applied = new, ["trailing_whitespace"]
    return lines, applied


def _share(rng: random.Random, items: list, low: float = 0.3, high: float = 0.8) -> list:
    """A random share of `items` (at least one when there are any), in their order."""
    if not items:
        return []
    keep = max(1, round(len(items) * rng.uniform(low, high)))
    return sorted(rng.sample(items, keep), key=items.index)


def _code_only(line: str) -> bool:
    """A line with no string or comment on it: a regex rewrite cannot touch a literal."""
    return not any(c in line for c in "'\"#\\")


def indent_width(lines: list[str], rng: random.Random) -> list[str]:
    """Re-indent with another width per level (2, 3 or 8 spaces, or tabs where the chunk starts at column 0),
    below the chunk's own base indentation (a chunk cut from a class body stays in it): E111/E114/E117, W191."""
    base = min((len(x) - len(x.lstrip(" ")) for x in lines if x.strip()), default=0)
    unit = rng.choice(["  ", "   ", " " * 8] + (["\t"] if base == 0 else []))
    out = []
    for line in lines:
        body = line.lstrip(" ")
        n = len(line) - len(body) - base
        out.append(" " * base + unit * (n // 4) + " " * (n % 4) + body if body and n >= 0 else line)
    return out


def _string_lines(lines: list[str]) -> set[int] | None:
    """0-based lines inside a multi-line string after its first line (their text is the string's), or None where the
    chunk does not tokenize on its own."""
    tokens = _tokens(lines)
    if tokens is None:
        return None
    return {i for t in tokens if t.type == tokenize.STRING for i in range(t.start[0], t.end[0])}


SPACING = {  # one author's habit each: (pattern, replacement) on code-only lines
    "no spaces around =": (re.compile(r"(?<=[\w\)\]]) = (?=[\w\(\[\-])"), "="),
    "no space after comma": (re.compile(r", (?=\S)"), ","),
    "no spaces around comparisons": (re.compile(r"(?<=[\w\)\]]) (==|!=|<=|>=) (?=[\w\(\[\-])"), r"\1"),
    "space inside brackets": (re.compile(r"([\(\[])(?=[\w\-])"), r"\1 "),
    "space before comma or colon": (re.compile(r"(?<=\w)(,|:)(?=[ \n]|$)"), r" \1"),
}


def operator_spacing(lines: list[str], rng: random.Random) -> list[str]:
    """One or two spacing habits on a share of the lines: E225, E231, E201, E203."""
    habits = [SPACING[h] for h in rng.sample(sorted(SPACING), rng.randint(1, 2))]
    touchable = [i for i, line in enumerate(lines) if _code_only(line)
                 and any(p.search(line) for p, _ in habits)]
    out = list(lines)
    for i in _share(rng, touchable, 0.5, 1.0):
        for pattern, repl in habits:
            out[i] = pattern.sub(repl, out[i])
    return out


def _tokens(lines: list[str]) -> list[tokenize.TokenInfo] | None:
    """The chunk's tokens, or None where it does not tokenize on its own (a cut through an indented block)."""
    try:
        return list(tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None


def long_lines(lines: list[str], rng: random.Random) -> list[str]:
    """Bracketed statements written over several lines joined into one line longer than 79 characters: E501."""
    tokens = _tokens(lines)
    if tokens is None:
        return lines
    depth, joins, commented = 0, set(), set()
    for tok in tokens:
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif tok.type == tokenize.NL and depth > 0:
            joins.add(tok.start[0] - 1)  # 0-based line that continues on the next
        elif tok.type == tokenize.COMMENT and depth > 0:
            commented.add(tok.start[0] - 1)
        elif tok.type == tokenize.STRING and tok.start[0] != tok.end[0]:
            commented.update(range(tok.start[0] - 1, tok.end[0]))  # a multi-line string keeps its lines
    statements, i = [], 0
    while i < len(lines):
        j = i
        while j in joins:
            j += 1
        if j > i and not any(k in commented for k in range(i, j + 1)):
            statements.append((i, j))
        i = j + 1
    joined = {}
    for i, j in statements:
        text = lines[i].rstrip()
        for k in range(i + 1, j + 1):
            part = lines[k].strip()
            text += part if text.endswith(("(", "[", "{")) or part.startswith((")", "]", "}")) else " " + part
        if len(text) > MAX_LINE:
            joined[i] = (j, text)
    out, i = [], 0
    chosen = set(_share(rng, sorted(joined), 0.5, 1.0))
    while i < len(lines):
        if i in chosen:
            j, text = joined[i]
            out.append(text)
            i = j + 1
        else:
            out.append(lines[i])
            i += 1
    return out


def blank_lines(lines: list[str], rng: random.Random) -> list[str]:
    """Blank-line rules broken: the two blank lines before top-level definitions dropped to one or none (E302,
    E305), or extra blank lines inside blocks (E303); never inside a multi-line string."""
    inside = _string_lines(lines)
    if inside is None:
        return lines
    out = list(lines)
    if rng.random() < 0.5:
        starts = [i for i in range(2, len(out)) if out[i].startswith(("def ", "class ", "@", "async def "))
                  and not out[i - 1].strip() and not out[i - 2].strip() and not {i - 2, i - 1, i} & inside]
        for i in reversed(_share(rng, starts, 0.5, 1.0)):
            del out[i - rng.randint(1, 2):i]
        if out != lines:
            return out
    blanks = [i for i in range(1, len(out) - 1) if not out[i].strip() and out[i - 1].strip()
              and out[i + 1].startswith((" ", "\t")) and not {i, i + 1} & inside]
    for i in reversed(_share(rng, blanks, 0.3, 0.8)):
        out[i:i] = [""] * rng.randint(1, 2)
    return out


def trailing_whitespace(lines: list[str], rng: random.Random) -> list[str]:
    """Spaces or a tab left at the end of lines (W291) and on blank lines (W293); not after a backslash that
    continues the line."""
    out = list(lines)
    for i in _share(rng, [i for i, line in enumerate(out) if not line.endswith("\\")], 0.2, 0.6):
        out[i] = out[i] + rng.choice([" ", "  ", "\t", "    "])
    return out


AMBIGUOUS = ("l", "O", "I")


def naming(lines: list[str], rng: random.Random) -> list[str]:
    """A variable assigned in the chunk renamed, everywhere in it, to an ambiguous one-letter name: E741."""
    tokens = _tokens(lines)
    if tokens is None:
        return lines
    taken = {t.string for t in tokens if t.type == tokenize.NAME}
    free = [a for a in AMBIGUOUS if a not in taken]
    depth, assigned = 0, set()
    for k, tok in enumerate(tokens[:-1]):
        if tok.type == tokenize.OP and tok.string in "([{)]}":
            depth += 1 if tok.string in "([{" else -1
        elif (tok.type == tokenize.NAME and depth == 0 and tokens[k + 1].string == "="  # `name = ...` statements
              and tok.line[:tok.start[1]].strip() == "" and not keyword.iskeyword(tok.string)):
            assigned.add(tok.string)
    assigned = sorted(assigned)
    if not free or not assigned:
        return lines
    old, new = rng.choice(assigned), rng.choice(free)
    spots, depth = [], 0
    for k, tok in enumerate(tokens):
        if tok.type == tokenize.OP and tok.string in "([{)]}":
            depth += 1 if tok.string in "([{" else -1
        elif (tok.type == tokenize.NAME and tok.string == old and not (k and tokens[k - 1].string == ".")
              and not (depth and k + 1 < len(tokens) and tokens[k + 1].string == "=")):  # attributes, keywords
            spots.append(tok.start)
    out = list(lines)
    for row, col in sorted(spots, reverse=True):
        line = out[row - 1]
        out[row - 1] = line[:col] + new + line[col + len(old):]
    return out


def comparisons(lines: list[str], rng: random.Random) -> list[str]:
    """`is None` / `is not None` written as `== None` / `!= None`: E711."""
    touchable = [i for i, line in enumerate(lines) if _code_only(line) and re.search(r" is (not )?None\b", line)]
    out = list(lines)
    for i in _share(rng, touchable, 0.5, 1.0):
        out[i] = re.sub(r" is not None\b", " != None", re.sub(r" is None\b", " == None", out[i]))
    return out


# The habits, in the order they are applied (a line count changes only in long_lines and blank_lines).
KINDS: dict[str, Callable[[list[str], random.Random], list[str]]] = {
    "naming": naming,
    "comparisons": comparisons,
    "operator_spacing": operator_spacing,
    "long_lines": long_lines,
    "blank_lines": blank_lines,
    "indent_width": indent_width,
    "trailing_whitespace": trailing_whitespace,
}
