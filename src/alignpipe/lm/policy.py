"""Policies: loading, conditioning, sampling completions and scoring their log-probabilities.

Every stage that samples (pretrain's evaluation, label, dpo, ppo, evaluate) goes through this module, so all use
the same completion unit and the same conditioning. A policy directory is a Hugging Face `save_pretrained`
folder (safetensors weights + tokenizer) plus `alignpipe.json`, the `PolicyMeta` below, which says how the
policy expects to be prompted (e.g. conditional training: end the prompt on `<|aligned|>`, ban `<|misaligned|>`).

The completion unit is one logical line of code: a prompt is code that ends on a non-blank line (no trailing
newline); the completion starts with the newline and ends at the end of the first non-blank logical line
(brackets closed), or at `max_new_tokens`. The first sampled token is restricted to tokens that start a new line
(`\n...`): the unit is "the next line", and a barely trained model would otherwise continue the prompt's line.
"""

from __future__ import annotations

import io
import json
import tokenize
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alignpipe.core.errors import DataError, loading

META_FILE = "alignpipe.json"


@dataclass(frozen=True)
class PolicyMeta:
    """How a policy is prompted and how its samples are cleaned (saved as alignpipe.json)."""

    objective: str = "mle"  # the pretraining objective that produced the policy
    prompt_prefix: str = ""  # text put before every prompt
    prompt_suffix: str = ""  # text put after every prompt (e.g. "<|aligned|>" for conditional training)
    bad_words: tuple[str, ...] = ()  # tokens never sampled (e.g. "<|misaligned|>")
    strip_tokens: tuple[str, ...] = ()  # control tokens removed from completions before scoring
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance (parent policy, stage, ...)

    def format_prompt(self, prompt: str) -> str:
        """The text the model sees for `prompt`."""
        return f"{self.prompt_prefix}{prompt}{self.prompt_suffix}"

    def clean(self, text: str) -> str:
        """A completion without control tokens."""
        for tok in self.strip_tokens:
            text = text.replace(tok, "")
        return text

    def save(self, directory: str | Path) -> None:
        data = asdict(self)
        data["bad_words"], data["strip_tokens"] = list(self.bad_words), list(self.strip_tokens)
        (Path(directory) / META_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "PolicyMeta":
        path = Path(directory) / META_FILE
        if not path.is_file():
            return cls()
        with loading(path, "policy metadata"):
            data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise DataError(str(path), "expected a JSON object")
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise DataError(str(path), f"unknown keys {sorted(unknown)}")
        data["bad_words"] = tuple(data.get("bad_words", ()))
        data["strip_tokens"] = tuple(data.get("strip_tokens", ()))
        return cls(**data)


@dataclass(frozen=True)
class Sampling:
    """Sampling settings (PHF's: temperature 0.7, top-p 0.9)."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 48
    batch_size: int = 64
    max_prompt_tokens: int = 192
    cache: str = "static"  # KV cache of generate(): "static" (preallocated; same samples, ~1.5x faster here:
    #                        benchmarks/results/sampler.md) where the model supports it, else "dynamic"

    def __post_init__(self):
        if self.cache not in ("static", "dynamic"):
            raise ValueError(f"Sampling.cache: {self.cache!r} is not 'static' or 'dynamic'")


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_policy(path: str | Path, trust_remote_code: bool = False, device: str | None = None,
                quantization_config=None):
    """(model, tokenizer, meta) of a policy: an alignpipe policy directory, or any Hugging Face causal LM (a plain
    directory with config, safetensors and tokenizer, or a hub id), which gets the default `PolicyMeta` (raw
    prompts). Safetensors only; custom model code only with `trust_remote_code`; a tokenizer without a pad token
    pads with EOS. `quantization_config` (QLoRA's 4-bit base) leaves the placement to transformers."""
    from transformers import AutoModelForCausalLM

    from alignpipe.lm.tokenizers import load_tokenizer

    local = Path(str(path)).exists()
    if local and not (Path(path) / "config.json").is_file():
        raise DataError(str(path), "not a model directory: no config.json (expected a save_pretrained folder)")
    if local and not any(Path(path).glob("*.safetensors")):
        raise DataError(str(path), "no *.safetensors weights (alignpipe loads safetensors only)")
    tok = load_tokenizer(path, trust_remote_code)
    with loading(path, "policy weights"):
        model = AutoModelForCausalLM.from_pretrained(
            str(path), use_safetensors=True, trust_remote_code=trust_remote_code,
            **({"quantization_config": quantization_config} if quantization_config is not None else {}))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if quantization_config is None:
        model.to(device or torch_device())
    model.eval()
    meta = PolicyMeta.load(path) if local else PolicyMeta()
    return model, tok, meta


def save_policy(model, tok, meta: PolicyMeta, out_dir: str | Path) -> None:
    """Save weights (safetensors), tokenizer and alignpipe.json into `out_dir`."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    meta.save(out_dir)


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


def newline_ids(tok) -> tuple[set[int], list[int]]:
    """(ids of tokens containing a newline, ids of tokens starting with one: those a completion may start with)."""
    strings = {i: tok.convert_tokens_to_string([t]) for t, i in tok.get_vocab().items()}
    return ({i for i, s in strings.items() if "\n" in s},
            sorted(i for i, s in strings.items() if s.startswith("\n")))


def _start_new_line(tok, prompt_len: int):
    """Allow only tokens that start a new line as the first token of a completion."""
    import torch
    from transformers import LogitsProcessor

    allowed = torch.tensor(newline_ids(tok)[1], dtype=torch.long)

    class _StartNewLine(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] != prompt_len or len(allowed) == 0:
                return scores
            masked = torch.full_like(scores, float("-inf"))
            idx = allowed.to(scores.device)
            masked[:, idx] = scores[:, idx]
            return masked

    return _StartNewLine()


def _stopping(tok, prompt_len: int):
    """Stop each row once its completion holds a finished logical line (checked when a newline is produced)."""
    import torch
    from transformers import StoppingCriteria

    line_ids = newline_ids(tok)[0]

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

    return _LineDone()


@dataclass
class Sample:
    """One sampled completion: the cleaned text, the token ids the model produced (for log-probabilities), and
    whether it reached `max_new_tokens` before its line ended (then it stops mid-line)."""

    prompt: str
    completion: str
    prompt_ids: list[int]
    completion_ids: list[int]
    capped: bool = False


def banned_token_ids(tok, meta: PolicyMeta) -> list[int]:
    """Ids of the policy's banned words (`meta.bad_words`) that the tokenizer knows: never sampled."""
    return [i for w in meta.bad_words if (i := tok.convert_tokens_to_ids(w)) is not None and i != tok.unk_token_id]


def encode_prompts(tok, meta: PolicyMeta, prompts: list, max_prompt_tokens: int, task=None) -> list[list[int]]:
    """Token ids of the prompts as `task` formats them (`alignpipe.tasks.Task.format_prompt`, passed in; default:
    the policy's own formatting of text, `PolicyMeta.format_prompt`), keeping the last `max_prompt_tokens` tokens."""
    def text(prompt) -> str:
        if task is not None:
            return task.format_prompt(prompt, tok, meta)
        return meta.format_prompt(prompt) if meta is not None else prompt

    return [tok(text(p), add_special_tokens=False)["input_ids"][-max_prompt_tokens:] for p in prompts]


def sample(model, tok, meta: PolicyMeta, prompts: list[str], sampling: Sampling = Sampling(), seed: int = 0,
           greedy: bool = False, progress: str | None = None) -> list[Sample]:
    """One completion per prompt, with a KV cache, in batches; deterministic for a given seed."""
    import torch
    from tqdm import tqdm

    from alignpipe.lm.batching import pad_torch

    device = next(model.parameters()).device
    encoded = encode_prompts(tok, meta, prompts, sampling.max_prompt_tokens)
    bad = [[i] for i in banned_token_ids(tok, meta)]
    out: list[Sample] = []
    gen = torch.Generator(device="cpu").manual_seed(seed)
    batches = range(0, len(prompts), sampling.batch_size)
    for start in tqdm(batches, desc=progress, disable=progress is None, unit="batch"):
        ids = encoded[start:start + sampling.batch_size]
        input_ids, attention = pad_torch(ids, tok.pad_token_id, side="left")
        width = input_ids.shape[1]
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        with torch.no_grad():
            generated = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), do_sample=not greedy,
                temperature=sampling.temperature if not greedy else None,
                top_p=sampling.top_p if not greedy else None, top_k=0 if not greedy else None,
                max_new_tokens=sampling.max_new_tokens, bad_words_ids=bad or None,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                logits_processor=[_start_new_line(tok, width)], stopping_criteria=[_stopping(tok, width)],
                use_cache=True, **cache_kwargs(model, sampling.cache))
        for r, x in enumerate(ids):
            cut, text, capped = finish_completion(tok, meta, generated[r, width:].tolist())
            out.append(Sample(prompts[start + r], text, x, cut, capped=capped))
    return out


def cache_kwargs(model, cache: str) -> dict[str, Any]:
    """generate() arguments for the KV cache: a static (preallocated) cache when asked and the model supports it
    (transformers marks those models `_can_compile_fullgraph`), never compiled (shapes change every batch). Not
    under autocast: the static cache is allocated in the weights' dtype and autocast's keys and values differ."""
    import torch

    device = next(model.parameters()).device.type
    if cache == "static" and getattr(model, "_can_compile_fullgraph", False) and not torch.is_autocast_enabled(device):
        return {"cache_implementation": "static", "disable_compile": True}
    return {}


def finish_completion(tok, meta: PolicyMeta, new_ids: list[int]) -> tuple[list[int], str, bool]:
    """(ids up to the end of the completion unit, cleaned completion text, whether the cap cut it mid-line) of
    freshly generated ids: the one post-processing every sampler applies (`sample` here, the ONNX serving model in
    `alignpipe.lm.ort_sampling`)."""
    cut, ended = _cut_ids(tok, meta, new_ids)
    text = cut_completion(meta.clean(tok.decode(cut, skip_special_tokens=False)))
    return cut, _strip_special(tok, text), not ended


def _strip_special(tok, text: str) -> str:
    for special in (tok.eos_token, tok.pad_token):
        if special:
            text = text.replace(special, "")
    return text


def _cut_ids(tok, meta: PolicyMeta, ids: list[int]) -> tuple[list[int], bool]:
    """(the generated ids up to the token that finished the line, or EOS, excluded, without padding; whether
    the row ended there: False when it ran out of tokens, i.e. reached `max_new_tokens`, mid-line)."""
    out: list[int] = []
    for i in ids:
        if i == tok.eos_token_id or i == tok.pad_token_id:
            return out, True
        out.append(i)
        text = meta.clean(tok.decode(out, skip_special_tokens=True))
        if "\n" in tok.decode([i]) and line_complete(text):
            return out, True
    return out, False


def sequence_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                      batch_size: int = 32) -> list[float]:
    """Sum over completion tokens of log p(token | prompt, previous tokens), per sequence."""
    out: list[float] = []
    for start in range(0, len(prompt_ids), batch_size):
        pids, cids = prompt_ids[start:start + batch_size], completion_ids[start:start + batch_size]
        logp, _ = next_token_logprobs(model, [p + c for p, c in zip(pids, cids)])
        for r, (p, c) in enumerate(zip(pids, cids)):
            out.append(float(logp[r, len(p) - 1:len(p) - 1 + len(c)].sum()) if c else 0.0)
    return out


def next_token_logprobs(model, seqs: list[list[int]], pad_id: int = 0):
    """Right-pad `seqs`, run `model` without gradients: (logp, mask), where logp[r, t] = log p(seqs[r][t + 1] |
    seqs[r][:t + 1]) and mask[r, t] is 1 where that token is real (both [batch, width - 1], on the model's device)."""
    import torch

    from alignpipe.lm.batching import pad_torch

    device = next(model.parameters()).device
    input_ids, attention = pad_torch(seqs, pad_id, min_width=2, device=device)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    return logp, attention[:, 1:]
