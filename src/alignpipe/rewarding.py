"""Reward models: load one and score (prompt, completion) pairs, formatted exactly as the reward stage trained
them. Used by the reward_model judge (label), ppo and evaluate."""

from __future__ import annotations

from pathlib import Path

from alignpipe.errors import DataError


def load_reward_model(path: str | Path, trust_remote_code: bool = False, device: str | None = None):
    """(model, tokenizer) of a reward model directory (AutoModelForSequenceClassification, one label)."""
    from transformers import AutoModelForSequenceClassification

    from alignpipe.policy import load_tokenizer, torch_device

    if Path(str(path)).exists() and not any(Path(path).glob("*.safetensors")):
        raise DataError(str(path), "no *.safetensors weights (alignpipe loads safetensors only)")
    tok = load_tokenizer(path, trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), use_safetensors=True,
                                                               trust_remote_code=trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    model.to(device or torch_device()).eval()
    return model, tok


def reward_text(prompt: str, completion: str, tok) -> str:
    """The text a reward model scores for one (prompt, completion): as the reward stage formats training pairs."""
    return prompt + completion + (tok.eos_token or "")


def reward_scores(model, tok, prompts: list[str], completions: list[str], batch_size: int = 32,
                  max_length: int = 256) -> list[float]:
    """Scalar rewards of completions (higher is better), keeping the last `max_length` tokens of each text."""
    import torch

    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        texts = [reward_text(p, c, tok) for p, c in
                 zip(prompts[start:start + batch_size], completions[start:start + batch_size], strict=True)]
        ids = [tok(t, add_special_tokens=False)["input_ids"][-max_length:] for t in texts]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        for r, x in enumerate(ids):  # right padding: the score is read at the last real token
            input_ids[r, :len(x)] = torch.tensor(x)
            attention[r, :len(x)] = 1
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        out.extend(float(v) for v in logits[:, 0])
    return out
