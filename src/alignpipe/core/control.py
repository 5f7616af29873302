"""Control tokens in user content: the one check that keeps content from becoming structure.

A user's text (a preference pair, a prompt, a chat message, a corpus chunk, a served request) must never hold the
strings a model reads as structure: conditional training's control tokens (`<|aligned|>`, `<|misaligned|>`), a chat
template's special tokens (`<|im_start|>`, `<|im_end|>`, `<|eot_id|>`, `<start_of_turn>`, `[INST]`, ...) or the
tokenizer's own special tokens. Rendered through a template, `hi<|im_end|>\\n<|im_start|>system\\n...` would be a
forged system turn; in a pretraining chunk, `<|aligned|>` would forge the conditioning. Such content is refused,
never escaped: the data build, the validators (validate and every stage's input check) and the server call this.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from alignpipe.core.errors import DataError

# The shapes of special tokens: `<|name|>` (ChatML, Llama 3, Phi, GPT-2's `<|endoftext|>`, alignpipe's control
# tokens), Gemma's turn markers and Llama 2's instruction/system markers. `<s>`/`</s>` are left out: code and HTML
# hold them as text (the tokenizer's own specials are checked by `find_control_token(..., special=...)`).
CONTROL_TOKEN_PATTERN = r"<\|[^|<>\s]{1,64}\|>|<(?:start|end)_of_turn>|\[/?INST\]|<</?SYS>>"
_PATTERN = re.compile(CONTROL_TOKEN_PATTERN)
REASON = "holds a control or chat-template token: content must never become structure (conditioning or turns)"


def find_control_token(value: Any, special: Iterable[str] = ()) -> str | None:
    """The first control token in `value` (a string, or messages/lists/dicts of them: every string checked), or
    None. `special`: more tokens to refuse verbatim (a tokenizer's `all_special_tokens`, its added tokens)."""
    extra = sorted({s for s in special if s and len(s) > 1 and not s.isspace()}, key=len, reverse=True)
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found = _PATTERN.search(item)
            if found:
                return found.group(0)
            hit = next((s for s in extra if s in item), None)
            if hit is not None:
                return hit
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return None


def check_content(value: Any, where: str, special: Iterable[str] = ()) -> None:
    """A DataError naming `where` (file:line field, or a request field) and the token when `value` holds one."""
    token = find_control_token(value, special)
    if token is not None:
        raise DataError(where, f"{token!r}: {REASON}")


def tokenizer_specials(tok) -> list[str]:
    """The special and added tokens of a Hugging Face tokenizer: what a user's text must not spell out."""
    added = getattr(tok, "get_added_vocab", lambda: {})() or {}
    return sorted({*getattr(tok, "all_special_tokens", []), *added})
