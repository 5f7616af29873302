"""Tokenizers: the one place a tokenizer is trained or loaded, and the control tokens of conditional training.

A byte-level BPE trained on the corpus (EOS, PAD and the control tokens as specials), or a Hugging Face tokenizer
(id or local directory). No hub download happens unless a Hugging Face id is given (and HF_HUB_OFFLINE is unset).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

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
    if getattr(tok, "chat_template", None):
        with loading(name_or_path, "chat template (rendering a probe conversation)"):
            tok.apply_chat_template(list(PROBE_CHAT), tokenize=False, add_generation_prompt=True)
    return tok


def control_ids(tok) -> tuple[int, int]:
    """Token ids of (<|aligned|>, <|misaligned|>)."""
    ids = tuple(tok.convert_tokens_to_ids(t) for t in CONTROL_TOKENS)
    if any(i is None or i == tok.unk_token_id for i in ids):
        raise ValueError(f"tokenizer lacks the control tokens {CONTROL_TOKENS}")
    return ids  # type: ignore[return-value]
