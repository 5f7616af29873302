"""The trained BPE: the indentation-unit option makes a newline its own token and each 4-space indent level one
token, and still decodes back to the text; the default keeps the GPT-2 split."""

from __future__ import annotations

from alignpipe.lm.tokenizers import train_tokenizer

CODE = ["def f(a, b):\n    if a:\n        return b\n    return a\n", "class A:\n    def g(self):\n        pass\n",
        "for i in range(3):\n    x = [i, i]\n"] * 20


def _pieces(tok, text: str) -> list[str]:
    return [tok.convert_tokens_to_string([t]) for t in tok.tokenize(text)]


def test_indent_units_make_the_indent_level_a_token_count():
    tok = train_tokenizer(CODE, vocab_size=320, min_frequency=2, indent_units=True)
    assert _pieces(tok, "if a:\n        b") == ["if", " a", ":", "\n", "    ", "    ", "b"]
    assert _pieces(tok, "\n     b").count("    ") == 1  # 5 spaces: one level and a stray space
    for text in CODE[:3] + ["x  =  1\n\n\n\tpass\n"]:
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.convert_tokens_to_ids("<|aligned|>") != tok.unk_token_id


def test_default_split_glues_newline_and_indent():
    pieces = _pieces(train_tokenizer(CODE, vocab_size=320, min_frequency=2), "if a:\n        b")
    assert pieces[-1] == " b" and any(p.startswith("\n ") for p in pieces)  # the opaque token of issue w15
