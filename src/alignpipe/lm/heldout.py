"""Held-out loss: the negative log-likelihood of plain text under a causal LM, in windows of tokens.

The one implementation behind pretrain's `heldout_loss` (nats per character: EOS + text, windows overlapping by one
token, control tokens masked, the training autocast) and evaluate's `heldout_ppl` (text alone, disjoint windows,
fp32): the callers differ only in the parameters below.
"""

from __future__ import annotations

from typing import Sequence


def text_windows(ids: list[int], window: int, stride: int) -> list[list[int]]:
    """Windows `ids[start:start + window]` for start = 0, stride, ... while at least two tokens remain (a window
    predicts all its tokens but the first). stride = window - 1 predicts every token once; stride = window skips
    each window's first token."""
    return [ids[start:start + window] for start in range(0, len(ids) - 1, stride)]


def heldout_nll(model, tok, texts: Sequence[str], window: int, stride: int | None = None, batch_size: int = 8,
                prepend_eos: bool = False, banned_ids: Sequence[int] = (), dtype=None) -> tuple[float, int]:
    """(total negative log-likelihood in nats, predicted tokens) of `texts`, each tokenized without special tokens
    (after an EOS with `prepend_eos`) and cut by `text_windows(ids, window, stride or window)`, scored in
    right-padded batches of `batch_size` windows. `banned_ids` get no probability (e.g. the control tokens, so the
    loss is that of a distribution over plain text); `dtype` turns on autocast for the forward pass (the
    log-softmax is fp32 either way)."""
    import contextlib

    import torch

    from alignpipe.lm.batching import pad_torch

    device = next(model.parameters()).device
    windows: list[list[int]] = []
    for text in texts:
        ids = ([tok.eos_token_id] if prepend_eos else []) + tok(text, add_special_tokens=False)["input_ids"]
        windows.extend(text_windows(ids, window, stride or window))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    total, n_tokens = 0.0, 0
    model.eval()
    with torch.no_grad(), autocast:
        for b in range(0, len(windows), batch_size):
            x, mask = pad_torch(windows[b:b + batch_size], pad_id, min_width=2, device=device)
            logits = model(input_ids=x, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            if banned_ids:
                logits[..., list(banned_ids)] = float("-inf")
            logp = torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None])[..., 0]
            valid = mask[:, 1:].bool()
            total -= float(logp[valid].sum())
            n_tokens += int(valid.sum())
    return total, n_tokens
