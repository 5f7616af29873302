"""Policies: loading, conditioning, sampling completions and scoring their log-probabilities.

Every stage that samples text prompts (pretrain's evaluation, label, dpo, ppo, grpo, evaluate) goes through this
module, so all use the same sampling and the same conditioning. A policy directory is a Hugging Face `save_pretrained`
folder (safetensors weights + tokenizer) plus `alignpipe.json`, the `PolicyMeta` below, which says how the
policy expects to be prompted (e.g. conditional training: end the prompt on `<|aligned|>`, ban `<|misaligned|>`).

Where a completion ends is the task's (`CompletionUnit`, passed in by the caller: `Task.completion_unit()`); this
module knows only EOS and `max_new_tokens`. PEP8's unit, one logical line of code, is
`alignpipe.tasks.pep8.LogicalLine`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alignpipe.core.config import MAX_BATCH, MAX_TOKENS, ConfigGroup
from alignpipe.core.config import field as config_field
from alignpipe.core.errors import DataError, loading

META_FILE = "alignpipe.json"
MAX_META_BYTES = 1 << 20  # an alignpipe.json larger than this is refused before reading (1 MiB)
MAX_META_TEXT = 16_384  # characters of a prompt prefix/suffix or of one bad/strip token (real ones: a few)
MAX_META_ITEMS = 1024  # bad_words or strip_tokens entries


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
        size = path.stat().st_size
        if size > MAX_META_BYTES:
            raise DataError(str(path), f"is {size} bytes, over the {MAX_META_BYTES}-byte limit of policy metadata")
        with loading(path, "policy metadata"):
            data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise DataError(str(path), "expected a JSON object")
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise DataError(str(path), f"unknown keys {sorted(unknown)}")
        data["bad_words"] = tuple(data.get("bad_words", ()))
        data["strip_tokens"] = tuple(data.get("strip_tokens", ()))
        _check_sizes(path, data)
        return cls(**data)


def _check_sizes(path: Path, data: dict[str, Any]) -> None:
    """Refuse metadata that would make every prompt huge (a 10 MB prompt prefix) or every sampling step slow."""
    for key in ("prompt_prefix", "prompt_suffix"):
        if len(str(data.get(key, ""))) > MAX_META_TEXT:
            raise DataError(f"{path}: {key}", f"{len(str(data[key]))} characters, over the limit of {MAX_META_TEXT}")
    for key in ("bad_words", "strip_tokens"):
        if len(data[key]) > MAX_META_ITEMS:
            raise DataError(f"{path}: {key}", f"{len(data[key])} entries, over the limit of {MAX_META_ITEMS}")
        if any(len(str(t)) > MAX_META_TEXT for t in data[key]):
            raise DataError(f"{path}: {key}", f"an entry longer than {MAX_META_TEXT} characters")


@dataclass(frozen=True)
class Sampling(ConfigGroup):
    """Sampling settings (PHF's: temperature 0.7, top-p 0.9): the `sampling` group of every stage that samples
    (`evaluate.sampling.temperature`, ...), each stage's defaults declared once, on its field."""

    temperature: float = config_field(0.7, "sampling temperature (PHF: 0.7)", gt=0)
    top_p: float = config_field(0.9, "nucleus sampling p (PHF: 0.9)", gt=0, le=1)
    max_new_tokens: int = config_field(48, "cap on a completion's tokens (a pep8 completion is one logical line)",
                                       ge=1, le=MAX_TOKENS)
    max_prompt_tokens: int = config_field(192, "keep the last N prompt tokens (capped by the model's positions)",
                                          ge=1, le=MAX_TOKENS)
    batch_size: int = config_field(64, "prompts sampled per generate call", ge=1, le=MAX_BATCH)
    cache: str = config_field(
        "static", "KV cache of generate(): static (preallocated; the same samples, ~1.5x faster here: "
        "benchmarks/results/sampler.md) where the model supports it, else dynamic", choices=("static", "dynamic"))


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

    from alignpipe.lm.models import load_pretrained
    from alignpipe.lm.tokenizers import load_tokenizer

    local = Path(str(path)).exists()
    if local and not (Path(path) / "config.json").is_file():
        raise DataError(str(path), "not a model directory: no config.json (expected a save_pretrained folder)")
    if local and not any(Path(path).glob("*.safetensors")):
        raise DataError(str(path), "no *.safetensors weights (alignpipe loads safetensors only)")
    tok = load_tokenizer(path, trust_remote_code)
    model = load_pretrained(AutoModelForCausalLM, path, "policy weights", tok, trust_remote_code=trust_remote_code,
                            **({"quantization_config": quantization_config} if quantization_config is not None
                               else {}))
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


class CompletionUnit:
    """Where a sampled completion ends: the hook a task fills in (`alignpipe.tasks.Task.completion_unit`). This base
    ends a completion at EOS (or padding) only, or at `max_new_tokens`."""

    def first_token_ids(self, tok) -> list[int]:
        """The tokens a completion may start with (empty: any)."""
        return []

    def stopping_criteria(self, tok, prompt_len: int) -> list:
        """`generate()`'s stopping criteria besides EOS (prompts left-padded to `prompt_len` tokens)."""
        return []

    def cut(self, tok, meta: "PolicyMeta", ids: list[int]) -> tuple[list[int], bool]:
        """(the generated ids up to the end of the completion, EOS excluded, without padding; whether the row ended
        there: False when it ran out of tokens, i.e. reached `max_new_tokens`)."""
        for n, i in enumerate(ids):
            if i == tok.eos_token_id or i == tok.pad_token_id:
                return list(ids[:n]), True
        return list(ids), False

    def ended_by_unit(self, tok, meta: "PolicyMeta", ids: list[int]) -> bool:
        """Whether `ids` (a sample's completion ids) end by the unit's own rule rather than at EOS or the cap."""
        return False

    def trim(self, text: str) -> str:
        """The completion text of the cut ids (decoded, control tokens removed), trimmed to the unit."""
        return text


def newline_ids(tok) -> tuple[set[int], list[int]]:
    """(ids of tokens containing a newline, ids of tokens starting with one: those a completion may start with)."""
    strings = {i: tok.convert_tokens_to_string([t]) for t, i in tok.get_vocab().items()}
    return ({i for i, s in strings.items() if "\n" in s},
            sorted(i for i, s in strings.items() if s.startswith("\n")))


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


def _first_tokens(allowed_ids: list[int], prompt_len: int):
    """Allow only `allowed_ids` as the first token of a completion."""
    import torch
    from transformers import LogitsProcessor

    allowed = torch.tensor(allowed_ids, dtype=torch.long)

    class _FirstTokens(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] != prompt_len or len(allowed) == 0:
                return scores
            masked = torch.full_like(scores, float("-inf"))
            idx = allowed.to(scores.device)
            masked[:, idx] = scores[:, idx]
            return masked

    return _FirstTokens()


def encode_prompts(tok, meta: PolicyMeta, prompts: list, max_prompt_tokens: int, task=None) -> list[list[int]]:
    """Token ids of the prompts as `task` formats them (`alignpipe.tasks.Task.format_prompt`, passed in; default:
    the policy's own formatting of text, `PolicyMeta.format_prompt`), keeping the last `max_prompt_tokens` tokens."""
    def text(prompt) -> str:
        if task is not None:
            return task.format_prompt(prompt, tok, meta)
        return meta.format_prompt(prompt) if meta is not None else prompt

    return [tok(text(p), add_special_tokens=False)["input_ids"][-max_prompt_tokens:] for p in prompts]


def sample(model, tok, meta: PolicyMeta, prompts: list, sampling: Sampling = Sampling(), seed: int = 0,
           greedy: bool = False, progress: str | None = None, *, unit: CompletionUnit, task=None) -> list[Sample]:
    """One completion per prompt, ending where `unit` (the task's `completion_unit()`) says, with a KV cache, in
    batches; deterministic for a given seed. Prompts are formatted by `task` when given (`encode_prompts`)."""
    import torch
    from tqdm import tqdm

    from alignpipe.lm.batching import pad_torch

    device = next(model.parameters()).device
    encoded = encode_prompts(tok, meta, prompts, sampling.max_prompt_tokens, task)
    bad = [[i] for i in banned_token_ids(tok, meta)]
    first = unit.first_token_ids(tok)
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
                logits_processor=[_first_tokens(first, width)] if first else [],
                stopping_criteria=unit.stopping_criteria(tok, width),
                use_cache=True, **cache_kwargs(model, sampling.cache))
        for r, x in enumerate(ids):
            cut, text, capped = finish_completion(tok, meta, generated[r, width:].tolist(), unit)
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


def finish_completion(tok, meta: PolicyMeta, new_ids: list[int], unit: CompletionUnit) -> tuple[list[int], str, bool]:
    """(ids up to the end of the completion `unit`, cleaned completion text, whether the cap cut it before the unit
    ended) of freshly generated ids: the one post-processing every sampler applies (`sample` here, the ONNX serving
    model in `alignpipe.lm.ort_sampling` through the task)."""
    cut, ended = unit.cut(tok, meta, new_ids)
    text = unit.trim(meta.clean(tok.decode(cut, skip_special_tokens=False)))
    return cut, _strip_special(tok, text), not ended


def _strip_special(tok, text: str) -> str:
    for special in (tok.eos_token, tok.pad_token):
        if special:
            text = text.replace(special, "")
    return text


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
