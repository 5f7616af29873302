"""Tokenizers: the one place a tokenizer is trained or loaded, and the control tokens of conditional training.

A byte-level BPE trained on the corpus (EOS, PAD and the control tokens as specials), or a Hugging Face tokenizer
(id or local directory). No hub download happens unless a Hugging Face id is given (and HF_HUB_OFFLINE is unset).
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

from alignpipe.core.errors import DataError, loading

# The files a saved tokenizer is read from (fast, SentencePiece, BPE or WordPiece vocabularies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# A conversation every usable chat template renders: a template that fails on it (a syntax error, a sandbox
# violation, an undefined call) is refused when the tokenizer is loaded, in one line, not mid-run in a traceback.
PROBE_CHAT = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "bye"})
EOS = "<|endoftext|>"
PAD = "<|pad|>"
ALIGNED = "<|aligned|>"
MISALIGNED = "<|misaligned|>"
CONTROL_TOKENS = (ALIGNED, MISALIGNED)
MAX_TEMPLATE_CHARS = 100_000  # a chat template longer than this is refused (real ones are a few KB)
TEMPLATE_SECONDS = 2.0  # CPU seconds rendering PROBE_CHAT may take (real templates: ~1 ms)
MAX_RENDERED_CHARS = 100_000  # ... and the most characters it may give


INDENT_SPLITS = ("merged", "units", "line")


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, indent: str, min_frequency: int = 2):
    """A byte-level BPE (GPT-2 style) trained on `texts`, with EOS, PAD and the two control tokens as specials.

    `indent` says how a line break and the next line's indentation are split before BPE:
    - `merged` (GPT-2's split): the newline and the indentation but its last space are one token and that space
      moves onto the next word: `"if a:\n        b"` -> `if`, ` a`, `:`, `\n       `, ` b`;
    - `line`: the newline and the whole indentation are one pre-token, the next word keeps no space: `if`, ` a`,
      `:`, `\n        `, `b` (one token per indentation width, the same whatever word follows);
    - `units`: each newline is its own token and every run of 4 spaces a pre-token of its own: `if`, ` a`, `:`,
      `\n`, `    `, `    `, `b` (the indent level is a count of one token).
    """
    from tokenizers import ByteLevelBPETokenizer, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if indent not in INDENT_SPLITS:
        raise ValueError(f"indent: {indent!r} is not one of {INDENT_SPLITS}")
    specials = [EOS, PAD, *CONTROL_TOKENS]
    if indent != "merged":
        splits = ([pre_tokenizers.Split(Regex("\n[ \t]*"), behavior="isolated")] if indent == "line" else
                  [pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
                   pre_tokenizers.Split(Regex(" {4}"), behavior="isolated")])
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.Sequence([
            *splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        bpe.train_from_iterator(texts, trainer=trainer)
    else:
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                   pad_token=PAD, additional_special_tokens=list(CONTROL_TOKENS))


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False, add_control_tokens: bool = False):
    """A Hugging Face tokenizer (id or local directory) with a pad token (EOS when it has none); with
    `add_control_tokens`, the control tokens it lacks are added as special tokens (pretraining a given tokenizer)."""
    from transformers import AutoTokenizer

    local = Path(str(name_or_path))
    if local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
        # Without these, transformers builds an empty tokenizer from config.json's model type, without a word.
        raise DataError(str(local), f"no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): save the "
                        "tokenizer with the model (save_pretrained)")
    with loading(name_or_path, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    missing = [t for t in CONTROL_TOKENS if t not in tok.get_vocab()] if add_control_tokens else []
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    check_chat_template(tok, str(name_or_path))
    return tok


def check_chat_template(tok, where: str) -> None:
    """Render PROBE_CHAT with the tokenizer's chat template, if it has one: a template that fails on it, is longer
    than MAX_TEMPLATE_CHARS, renders slower than TEMPLATE_SECONDS (a template looping `range(100000)` twice) or
    larger than MAX_RENDERED_CHARS is refused with one DataError line naming `where`."""
    template = getattr(tok, "chat_template", None)
    if not template:
        return
    for text in template.values() if isinstance(template, dict) else [template]:
        if len(str(text)) > MAX_TEMPLATE_CHARS:
            raise DataError(where, f"chat template of {len(str(text))} characters, over the limit of "
                                   f"{MAX_TEMPLATE_CHARS}")
    with loading(where, "chat template (rendering a probe conversation)"), \
            _deadline(TEMPLATE_SECONDS, where, "rendering the chat template on a three-message conversation"):
        rendered = tok.apply_chat_template(list(PROBE_CHAT), tokenize=False, add_generation_prompt=True)
    if isinstance(rendered, str) and len(rendered) > MAX_RENDERED_CHARS:
        raise DataError(where, f"the chat template renders a three-message conversation as {len(rendered)} "
                               f"characters, over the limit of {MAX_RENDERED_CHARS}")


@contextlib.contextmanager
def _deadline(seconds: float, where: str, what: str) -> Iterator[None]:
    """Raise a DataError inside the block's Python code once it has run `seconds` (a trace function: works in any
    thread, and a Jinja template's loops are Python code)."""
    end = time.thread_time() + seconds  # CPU time of this thread: a loaded machine does not trip it

    def tracer(frame, event, arg):
        if time.thread_time() > end:
            raise DataError(where, f"{what} took over {seconds:g} s; refusing the template")
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(previous)


def control_ids(tok) -> tuple[int, int]:
    """Token ids of (<|aligned|>, <|misaligned|>)."""
    ids = tuple(tok.convert_tokens_to_ids(t) for t in CONTROL_TOKENS)
    if any(i is None or i == tok.unk_token_id for i in ids):
        raise ValueError(f"tokenizer lacks the control tokens {CONTROL_TOKENS}")
    return ids  # type: ignore[return-value]
