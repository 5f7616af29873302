"""ONNX export of the policy (a KV-cache decoder) and the reward model, and onnxruntime sessions to run them.

Written by hand because optimum's exporter does not install beside transformers 5.
The policy graph takes `input_ids`, `attention_mask` and the past keys/values as flat tensors and returns
`logits` and the present keys/values, so one graph serves both the prompt (empty past) and every decoding step;
`OrtPolicy.generate` is the greedy/sampling loop over it. The reward graph maps `input_ids`, `attention_mask` to
`rewards` (batch,). torch, onnx and onnxruntime are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

POLICY_INPUTS = ("input_ids", "attention_mask")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def past_names(n_layer: int) -> list[str]:
    """Names of the past key/value inputs of the policy graph, layer by layer (key then value)."""
    return [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    """Names of the present key/value outputs of the policy graph, in the order of `past_names`."""
    return [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def position_ids_from_mask(attention_mask):
    """Positions counted over attended tokens only, as `generate()` computes them for left-padded batches."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 0)


def cache_shape(model) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of a causal LM's KV cache, read from one forward pass (so grouped-query
    attention, Llama's head_dim and GPT-NeoX's head size need no per-family config reading)."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=model.device), use_cache=True)
    layers = out.past_key_values.layers
    _, heads, _, head_dim = layers[0].keys.shape
    return len(layers), int(heads), int(head_dim)


def _decoder_with_past(model, n_layer: int):
    """Wrap a causal LM so that its cache goes in and out as flat tensors (transformers 5 uses Cache objects)."""
    import torch
    from transformers import DynamicCache

    class DecoderWithPast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, *past):
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(n_layer)])
            position_ids = position_ids_from_mask(attention_mask)[:, -input_ids.shape[1]:]
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    return DecoderWithPast().eval()


def _reward_head(model):
    """Wrap a one-label sequence classifier so that the graph returns `rewards` of shape (batch,)."""
    import torch

    class RewardHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]

    return RewardHead().eval()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's notes about its own internals (axis renaming, torchvision ops, pytree deprecations);
    the parity checks, not these notes, tell whether the graph is right."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        registration.setLevel(level)


def export_policy(model, path: str | Path, opset: int = 18) -> None:
    """Export a causal LM (GPT-2, Llama, Qwen2, GPT-NeoX, ...) as a KV-cache decoder (dynamic batch, sequence and
    past lengths)."""
    import torch

    cfg = model.config
    n_layer, n_head, head_dim = cache_shape(model.eval())
    batch, seq, past, total = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    # Example shapes: batch 2 and a non-empty past, so the exporter keeps every axis symbolic.
    input_ids = torch.randint(0, cfg.vocab_size, (2, 3))
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    pasts = tuple(torch.zeros(2, n_head, 4, head_dim) for _ in range(2 * n_layer))
    dynamic_shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
                      "past": tuple({0: batch, 2: past} for _ in pasts)}
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(_decoder_with_past(model.eval(), n_layer), (input_ids, attention_mask, *pasts), str(path),
                          dynamo=True, verbose=False, external_data=False, opset_version=opset,
                          input_names=[*POLICY_INPUTS, *past_names(n_layer)],
                          output_names=["logits", *present_names(n_layer)], dynamic_shapes=dynamic_shapes)


def export_reward(model, path: str | Path, opset: int = 18) -> None:
    """Export a one-label sequence classifier as `rewards = f(input_ids, attention_mask)`."""
    import torch

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    input_ids = torch.randint(0, model.config.vocab_size, (2, 5))
    attention_mask = torch.ones(2, 5, dtype=torch.long)
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(_reward_head(model.eval()), (input_ids, attention_mask), str(path), dynamo=True,
                          verbose=False, external_data=False, opset_version=opset, input_names=list(POLICY_INPUTS),
                          output_names=["rewards"],
                          dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})


def quantize_int8(src: str | Path, dst: str | Path) -> None:
    """int8 dynamic quantization of the weights of every MatMul/Gemm (activations quantized at run time), after
    onnxruntime's recommended pre-processing (shape inference and graph optimisation)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = Path(dst).with_suffix(".prep.onnx")
    try:
        quant_pre_process(str(src), str(prepared))
        quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)


def choose_providers(device: str = "auto") -> list[str]:
    """Execution providers to ask for: CUDA first when a GPU is usable (onnxruntime-gpu on a GPU node), else CPU.

    `device` is `auto`, `cpu` or `cuda`. onnxruntime-gpu lists CUDA even where CUDA cannot load, so a GPU is
    taken to be usable only when torch also sees one.
    """
    import onnxruntime as ort

    if device == "cpu":
        return [CPU]
    cuda_listed = CUDA in ort.get_available_providers()
    if device == "cuda":
        if not cuda_listed:
            raise ValueError("this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
        return [CUDA, CPU]
    import torch

    return [CUDA, CPU] if cuda_listed and torch.cuda.is_available() else [CPU]


def open_session(path: str | Path, providers: Sequence[str], threads: int = 0, strict: bool = True,
                 spin: bool = True):
    """An InferenceSession with every graph optimisation on. onnxruntime falls back to the CPU when a provider
    fails to load (e.g. CUDA libraries missing); `strict` makes that an error instead. `session.get_providers()`
    tells what runs. `spin=False` stops idle intra-op threads from busy-waiting (a server shares its CPUs with
    its HTTP loop)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # No TF32 on CUDA: fp32 graphs are checked against fp32 PyTorch, which does not use TF32 for matmuls.
    entries = [(p, {"use_tf32": "0"}) if p == CUDA else p for p in providers]
    session = ort.InferenceSession(str(path), sess_options=options, providers=entries)
    if strict and session.get_providers()[0] != providers[0]:
        raise RuntimeError(f"{path}: asked for {providers[0]} but onnxruntime runs on {session.get_providers()}")
    return session


def io_signature(session) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs of a session: name, element type and shape (None for a dynamic axis)."""
    def describe(args):
        return [{"name": a.name, "type": a.type,
                 "shape": [d if isinstance(d, int) else None for d in a.shape]} for a in args]

    return {"inputs": describe(session.get_inputs()), "outputs": describe(session.get_outputs())}


class OrtReward:
    """Reward scoring on one onnxruntime session."""

    def __init__(self, session):
        self.session = session

    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Rewards (batch,) for right- or left-padded token ids."""
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                 "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64)}
        return self.session.run(["rewards"], feeds)[0]


class OrtPolicy:
    """The KV-cache decoder on one onnxruntime session, with IO binding so the cache stays where it was made."""

    def __init__(self, session):
        self.session = session
        self.past_names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        self.present_names = [o.name for o in session.get_outputs() if o.name.startswith("present.")]
        shape = session.get_inputs()[len(POLICY_INPUTS)].shape
        self.n_head, self.head_dim = int(shape[1]), int(shape[3])
        self.device = "cuda" if session.get_providers()[0] == CUDA else "cpu"

    def _empty_past(self, batch: int) -> list:
        import onnxruntime as ort

        return [ort.OrtValue.ortvalue_from_shape_and_type([batch, self.n_head, 0, self.head_dim], np.float32,
                                                          self.device, 0) for _ in self.past_names]

    def _step(self, binding, input_ids: np.ndarray, attention_mask: np.ndarray, past: list):
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        for name, value in zip(self.past_names, past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), outputs[1:]

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray, prefill: int | None = None) -> np.ndarray:
        """Logits (batch, seq, vocab): the first `prefill` tokens in one call, then one token per call through
        the cache (the path generation takes). `prefill=None` runs the whole sequence at once."""
        prefill = input_ids.shape[1] if prefill is None else prefill
        binding = self.session.io_binding()
        logits, past = self._step(binding, input_ids[:, :prefill], attention_mask[:, :prefill],
                                  self._empty_past(len(input_ids)))
        chunks = [logits]
        for t in range(prefill, input_ids.shape[1]):
            step_logits, past = self._step(binding, input_ids[:, t:t + 1], attention_mask[:, :t + 1], past)
            chunks.append(step_logits)
        return np.concatenate(chunks, axis=1)

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int, *,
                 eos_token_id: int | None = None, pad_token_id: int = 0, bad_token_ids: Sequence[int] = (),
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 rng: np.random.Generator | None = None) -> np.ndarray:
        """Continue left-padded prompts; returns prompt + new tokens (batch, seq + n), like `generate()`.

        Rows that produced `eos_token_id` continue with `pad_token_id`; the loop stops when all rows have.
        Sampling follows `generate()`'s order: temperature, then top-k, then a draw from the softmax.
        """
        batch = len(input_ids)
        binding = self.session.io_binding()
        past = self._empty_past(batch)
        finished = np.zeros(batch, dtype=bool)
        step_ids, mask, new = input_ids, attention_mask, []
        rng = rng if rng is not None else np.random.default_rng(0)
        for _ in range(max_new_tokens):
            logits, past = self._step(binding, step_ids, mask, past)
            scores = logits[:, -1, :].astype(np.float32, copy=True)
            if len(bad_token_ids):
                scores[:, list(bad_token_ids)] = -np.inf
            token = _sample(scores, temperature, top_k, rng) if do_sample else scores.argmax(-1)
            if eos_token_id is not None:
                token = np.where(finished, pad_token_id, token)
                finished |= token == eos_token_id
            new.append(token.astype(np.int64))
            if finished.all():
                break
            step_ids = new[-1][:, None]
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=mask.dtype)], axis=1)
        return np.concatenate([input_ids, np.stack(new, axis=1)], axis=1)


def _sample(scores: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> np.ndarray:
    scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = np.partition(scores, -top_k, axis=-1)[:, -top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    u = rng.random((len(scores), 1))
    return np.minimum((probs.cumsum(-1) < u).sum(-1), scores.shape[-1] - 1)


def torch_generate(model, input_ids, attention_mask, max_new_tokens: int, *, eos_token_id: int | None,
                   pad_token_id: int, bad_token_ids: Sequence[int] = ()):
    """PyTorch greedy `generate()` with exactly the settings `OrtPolicy.generate` applies (no saved
    generation_config.json defaults); the reference for the parity check and the benchmark."""
    import torch
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                           pad_token_id=pad_token_id,
                           bad_words_ids=[[int(t)] for t in bad_token_ids] or None)
    device = model.device
    with torch.no_grad():
        return model.generate(input_ids=torch.as_tensor(input_ids, device=device),
                              attention_mask=torch.as_tensor(attention_mask, device=device),
                              generation_config=gen).cpu().numpy()


def torch_logits(model, input_ids, attention_mask) -> np.ndarray:
    """PyTorch logits for left-padded sequences, with the positions `generate()` would use."""
    import torch

    ids, mask = torch.as_tensor(input_ids, device=model.device), torch.as_tensor(attention_mask, device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    return logits.cpu().numpy()


def torch_rewards(model, input_ids, attention_mask) -> np.ndarray:
    """PyTorch rewards (batch,) of a one-label sequence classifier."""
    import torch

    with torch.no_grad():
        rewards = model(input_ids=torch.as_tensor(input_ids, device=model.device),
                        attention_mask=torch.as_tensor(attention_mask, device=model.device)).logits[:, 0]
    return rewards.cpu().numpy()


def median_seconds(repeats: int, fns: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """Median seconds per call of each function. The functions take turns, so a change of machine load hits all
    alike; each timed call follows an untimed one, so no call pays for the other library's thread wake-up."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            fn()
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}
