"""The trained BPE's three splits of a line break and its indentation (GPT-2's merged one, the whole indent as one
token, 4-space units); each decodes back to the text."""

from __future__ import annotations

from alignpipe.lm.tokenizers import train_tokenizer

CODE = ["def f(a, b):\n    if a:\n        return b\n    return a\n", "class A:\n    def g(self):\n        pass\n",
        "for i in range(3):\n    x = [i, i]\n"] * 20


def _pieces(tok, text: str) -> list[str]:
    return [tok.convert_tokens_to_string([t]) for t in tok.tokenize(text)]


def test_indent_units_make_the_indent_level_a_token_count():
    tok = train_tokenizer(CODE, vocab_size=320, min_frequency=2, indent="units")
    assert _pieces(tok, "if a:\n        b") == ["if", " a", ":", "\n", "    ", "    ", "b"]
    assert _pieces(tok, "\n     b").count("    ") == 1  # 5 spaces: one level and a stray space
    for text in CODE[:3] + ["x  =  1\n\n\n\tpass\n"]:
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.convert_tokens_to_ids("<|aligned|>") != tok.unk_token_id


def test_default_split_glues_newline_and_indent():
    pieces = _pieces(train_tokenizer(CODE, vocab_size=320, min_frequency=2, indent="merged"), "if a:\n        b")
    assert pieces[-1] == " b" and any(p.startswith("\n ") for p in pieces)  # the opaque token of issue w15


def test_line_split_keeps_newline_and_whole_indent_in_one_token():
    tok = train_tokenizer(CODE, vocab_size=320, min_frequency=2, indent="line")
    assert _pieces(tok, "if a:\n        b") == ["if", " a", ":", "\n        ", "b"]
    assert _pieces(tok, "x\n    return a")[1] == "\n    "  # the same indent token whatever word follows
    for text in CODE[:3] + ["x  =  1\n\n\n\tpass\n"]:
        assert tok.decode(tok(text)["input_ids"]) == text
