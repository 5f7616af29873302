"""Reward models: load one and score (prompt, completion) pairs, formatted exactly as the reward stage trained
them. Used by the reward_model judge (label), ppo and evaluate.

The format is TRL 1.16 RewardTrainer's for standard (non-conversational) pairs with an explicit prompt: the text
is `prompt + completion`, with the tokenizer's EOS appended unless it already ends with it, tokenized by calling
the tokenizer with its default special tokens (`tok(text)`); the reward is the score head's output at the last
non-padding token. The prompt is the raw prompt: no policy control tokens (`<|aligned|>`), since the reward
model judges code, not the policy's conditioning; a reward model may be trained on the last lines of each prompt
only (`reward.prompt_lines`, saved in its config as `alignpipe_prompt_lines` and applied here when scoring).
`tests/test_reward.py` checks this against the trainer's own tokenized dataset.

Conversational pairs (TRL's form: the prompt a list of role/content messages; the task `chat`): the text is the
tokenizer's chat template over prompt + completion turns, tokenized as RewardTrainer does
(`apply_chat_template(..., tokenize=True, return_dict=True)`); a completion given as a string (a policy's sample) is
one assistant turn. `prompt_lines` does not apply to them.
"""

from __future__ import annotations

from pathlib import Path

from alignpipe.core.errors import DataError


def load_reward_model(path: str | Path, trust_remote_code: bool = False, device: str | None = None):
    """(model, tokenizer) of a reward model directory (AutoModelForSequenceClassification, one label)."""
    from transformers import AutoModelForSequenceClassification

    from alignpipe.lm.models import load_pretrained
    from alignpipe.lm.policy import torch_device
    from alignpipe.lm.tokenizers import load_tokenizer

    if Path(str(path)).exists() and not any(Path(path).glob("*.safetensors")):
        raise DataError(str(path), "no *.safetensors weights (alignpipe loads safetensors only)")
    tok = load_tokenizer(path, trust_remote_code)
    model = load_pretrained(AutoModelForSequenceClassification, path, "reward model weights", tok,
                            trust_remote_code=trust_remote_code)
    if model.config.num_labels != 1:
        raise DataError(str(path), f"a reward model has one output (num_labels=1), got {model.config.num_labels}")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    model.to(device or torch_device()).eval()
    return model, tok


PROMPT_LINES_KEY = "alignpipe_prompt_lines"  # reward model config attribute: prompt lines it reads (0: all)


def reward_prompt(prompt: str, prompt_lines: int = 0) -> str:
    """The part of a prompt a reward model reads: its last `prompt_lines` lines (all when 0)."""
    return "\n".join(prompt.split("\n")[-prompt_lines:]) if prompt_lines > 0 else prompt


def reward_text(prompt: str, completion: str, tok, prompt_lines: int = 0) -> str:
    """The text a reward model scores for one (prompt, completion): as RewardTrainer formats training pairs."""
    eos = tok.eos_token or ""
    return reward_prompt(prompt, prompt_lines) + (completion if completion.endswith(eos) else completion + eos)


def reward_ids(prompt, completion, tok, prompt_lines: int = 0) -> list[int]:
    """The token ids RewardTrainer trains on for one (prompt, completion) (before its max_length filter); prompt
    and completion are strings, or messages (a string completion of a message prompt is one assistant turn)."""
    if isinstance(prompt, list):
        turns = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        return tok.apply_chat_template(prompt + turns, tokenize=True, return_dict=True, tools=None)["input_ids"]
    return tok(reward_text(prompt, completion, tok, prompt_lines))["input_ids"]


def reward_scores(model, tok, prompts: list, completions: list, batch_size: int = 32,
                  max_length: int = 256) -> list[float]:
    """Scalar rewards of completions (higher is better). Texts longer than `max_length` tokens (or than the
    model's positions) keep their last tokens (training drops such pairs instead; scoring must give every sample
    a reward)."""
    import torch

    from alignpipe.lm.batching import pad_torch

    if len(prompts) != len(completions):
        raise ValueError(f"reward_scores: {len(prompts)} prompts but {len(completions)} completions")
    device = next(model.parameters()).device
    max_length = min(max_length, getattr(model.config, "max_position_embeddings", None) or max_length)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else tok.pad_token_id
    prompt_lines = int(getattr(model.config, PROMPT_LINES_KEY, 0) or 0)
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        ids = [reward_ids(p, c, tok, prompt_lines)[-max_length:] for p, c in
               zip(prompts[start:start + batch_size], completions[start:start + batch_size])]
        # right padding, as the trainer's collator: the score is read at the last real token
        input_ids, attention = pad_torch(ids, pad, device=device)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention).logits
        out.extend(float(v) for v in logits[:, 0].float())
    return out
