"""MLflow pyfunc serving models that run the exported ONNX graphs with onnxruntime and batch concurrent requests.

`mlflow models serve` calls `predict` from a thread pool (one thread per request in flight), so concurrent
requests meet in a `RequestBatcher`: the first request waits up to `batch_window_ms` for others with the same
settings, and up to `max_batch_size` prompts go through the decoder together. The policy model answers like
`alignpipe.lm.policy.sample` (conditioning, banned tokens, one logical line, whitespace kept); the reward model
scores prompt/completion pairs as `alignpipe.lm.reward_model.reward_scores` does. Bad requests raise
MlflowException(INVALID_PARAMETER_VALUE): the server answers 400.
"""

from __future__ import annotations

import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Hashable

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

SERVING_PACKAGES = ("onnxruntime", "tokenizers", "transformers", "numpy")
# model_config keys and their defaults (`register.serve_*` params override them when logging). One intra-op
# thread: at this model size onnxruntime's spinning thread pool costs more than it gives when the CPUs are busy
# (measured on the 2-CPU machine at load average 14: batch 6 x 48 tokens 0.66 s with 1 thread, 1.40 s with the
# default); scale out with server workers instead.
POLICY_DEFAULTS = {"max_new_tokens": 48, "temperature": 0.7, "top_p": 0.9, "do_sample": True,
                   "max_prompt_tokens": 192, "max_batch_size": 16, "batch_window_ms": 5.0, "providers": "auto",
                   "intra_op_threads": 1, "seed": 0}
REWARD_DEFAULTS = {"max_length": 256, "max_batch_size": 16, "batch_window_ms": 5.0, "providers": "auto",
                   "intra_op_threads": 1}


def bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class RequestBatcher:
    """Merges items submitted concurrently under the same key into calls of `run(key, items) -> results`."""

    def __init__(self, run: Callable[[Hashable, list], list], max_batch_size: int, window_s: float):
        self.run, self.max_batch_size, self.window_s = run, max_batch_size, window_s
        self.pending: list[tuple[Hashable, list, Future]] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._loop, daemon=True, name="request-batcher").start()

    def submit(self, key: Hashable, items: list) -> list:
        """Results for `items` (blocks until their batch ran; re-raises its error)."""
        future: Future = Future()
        with self.cond:
            self.pending.append((key, items, future))
            self.cond.notify()
        return future.result()

    def _take(self) -> tuple[Hashable, list[tuple[list, Future]]]:
        with self.cond:
            while not self.pending:
                self.cond.wait()
            key = self.pending[0][0]
            deadline = time.monotonic() + self.window_s
            while True:
                same = [p for p in self.pending if p[0] == key]
                if sum(len(p[1]) for p in same) >= self.max_batch_size or time.monotonic() >= deadline:
                    break
                self.cond.wait(deadline - time.monotonic())
            taken, size = [], 0
            for p in same:
                if taken and size + len(p[1]) > self.max_batch_size:
                    break
                taken.append(p)
                size += len(p[1])
            for p in taken:
                self.pending.remove(p)
            return key, [(items, future) for _, items, future in taken]

    def _loop(self) -> None:
        while True:
            key, group = self._take()
            try:
                results = self.run(key, [x for items, _ in group for x in items])
            except Exception as e:  # handed to every waiting request, which re-raises it
                for _, future in group:
                    future.set_exception(e)
                continue
            start = 0
            for items, future in group:
                future.set_result(results[start:start + len(items)])
                start += len(items)


def _session(path: str, config: dict[str, Any]):
    from alignpipe.lm import onnx_runtime as ox

    return ox.open_session(path, ox.choose_providers(config["providers"]), int(config["intra_op_threads"]),
                           strict=False)


def _strings(model_input: Any, what: str) -> list:
    """The request's rows as a list (a DataFrame's first column, or a list), checked non-empty."""
    if hasattr(model_input, "columns"):
        model_input = model_input.iloc[:, 0].tolist() if len(model_input.columns) == 1 else \
            model_input.to_dict("records")
    if not isinstance(model_input, list) or not model_input:
        raise bad_request(f"inputs must be a non-empty list of {what}")
    return model_input


class OnnxPolicyModel(mlflow.pyfunc.PythonModel):
    """Plain prompt strings in, completions out (one logical line, whitespace kept)."""

    def load_context(self, context):
        import numpy as np

        from alignpipe.lm.onnx_runtime import OrtPolicy
        from alignpipe.lm.ort_sampling import OrtCompleter
        from alignpipe.lm.policy import PolicyMeta
        from alignpipe.lm.tokenizers import load_tokenizer

        self.config = {**POLICY_DEFAULTS, **(context.model_config or {})}
        tok_dir = context.artifacts["tokenizer"]
        policy = OrtPolicy(_session(context.artifacts["policy_onnx"], self.config))
        self.completer = OrtCompleter(policy, load_tokenizer(tok_dir), PolicyMeta.load(tok_dir),
                                      int(self.config["max_prompt_tokens"]))
        self.rng = np.random.default_rng(int(self.config["seed"]))
        self.batcher = RequestBatcher(lambda key, prompts: self.completer.complete(prompts, key, self.rng),
                                      int(self.config["max_batch_size"]), float(self.config["batch_window_ms"]) / 1e3)

    def decoding(self, params: dict[str, Any] | None):
        """The request's Decoding: the model_config defaults with the request's params, checked."""
        from alignpipe.lm.ort_sampling import Decoding

        params = params or {}
        unknown = set(params) - {"max_new_tokens", "temperature", "top_p", "do_sample"}
        if unknown:
            raise bad_request(f"unknown params {sorted(unknown)}")
        merged = {k: params.get(k, self.config[k]) for k in ("max_new_tokens", "temperature", "top_p", "do_sample")}
        cap = int(self.config["max_new_tokens"])
        if not isinstance(merged["max_new_tokens"], int) or not 1 <= merged["max_new_tokens"] <= cap:
            raise bad_request(f"params.max_new_tokens must be an integer in [1, {cap}], got {merged['max_new_tokens']!r}")
        if not isinstance(merged["temperature"], (int, float)) or merged["temperature"] <= 0:
            raise bad_request(f"params.temperature must be > 0, got {merged['temperature']!r}")
        if not isinstance(merged["top_p"], (int, float)) or not 0 < merged["top_p"] <= 1:
            raise bad_request(f"params.top_p must be in (0, 1], got {merged['top_p']!r}")
        return Decoding(int(merged["max_new_tokens"]), bool(merged["do_sample"]), float(merged["temperature"]),
                        float(merged["top_p"]))

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        prompts = _strings(model_input, "prompt strings")
        if not all(isinstance(p, str) and p.strip() for p in prompts):
            raise bad_request("every input must be a non-blank prompt string")
        return self.batcher.submit(self.decoding(params), prompts)


class OnnxRewardModel(mlflow.pyfunc.PythonModel):
    """{"prompt", "completion"} records in, raw rewards out (higher is better)."""

    def load_context(self, context):
        from alignpipe.lm.onnx_runtime import OrtReward
        from alignpipe.lm.tokenizers import load_tokenizer

        self.config = {**REWARD_DEFAULTS, **(context.model_config or {})}
        self.tok = load_tokenizer(context.artifacts["tokenizer"])
        self.prompt_lines = int((context.model_config or {}).get("prompt_lines", 0))
        self.pad_id = int((context.model_config or {}).get("pad_token_id", self.tok.pad_token_id))
        self.reward = OrtReward(_session(context.artifacts["reward_onnx"], self.config))
        self.batcher = RequestBatcher(lambda key, pairs: self._score(pairs), int(self.config["max_batch_size"]),
                                      float(self.config["batch_window_ms"]) / 1e3)

    def _score(self, pairs: list[tuple[str, str]]) -> list[float]:
        from alignpipe.lm.batching import pad
        from alignpipe.lm.reward_model import reward_ids

        max_length = int(self.config["max_length"])
        ids = [reward_ids(p, c, self.tok, self.prompt_lines)[-max_length:] for p, c in pairs]
        input_ids, mask = pad(ids, self.pad_id)  # right padding, as reward_scores and the trainer's collator
        return [float(v) for v in self.reward.score(input_ids, mask)]

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[float]:
        rows = _strings(model_input, "{\"prompt\", \"completion\"} objects")
        pairs = []
        for i, row in enumerate(rows):
            if not (isinstance(row, dict) and isinstance(row.get("prompt"), str)
                    and isinstance(row.get("completion"), str)):
                raise bad_request(f"inputs[{i}] must be an object with string 'prompt' and 'completion'")
            pairs.append((row["prompt"], row["completion"]))
        return self.batcher.submit(None, pairs)


def log_policy_model(onnx_path: Path, policy_dir: Path, model_config: dict[str, Any], name: str = "policy_serving"):
    """Log the ONNX policy as an `OnnxPolicyModel` pyfunc to the active run; returns the ModelInfo."""
    from mlflow.models import infer_signature

    from alignpipe.tracking.registry import pip_requirements

    from alignpipe.lm.policy import PolicyMeta
    from alignpipe.lm.tokenizers import load_tokenizer

    config = {**POLICY_DEFAULTS, **model_config}
    # MLflow fills a request's missing params with the signature's values: they must be the model_config's.
    signature = infer_signature(["def add(a, b):"], ["\n    return a + b"],
                                params={k: config[k] for k in ("max_new_tokens", "temperature", "top_p", "do_sample")})
    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer and alignpipe.json, not the PyTorch weights
        load_tokenizer(policy_dir).save_pretrained(tmp)
        PolicyMeta.load(policy_dir).save(tmp)
        return mlflow.pyfunc.log_model(
            name=name, python_model=OnnxPolicyModel(), signature=signature,
            artifacts={"policy_onnx": str(onnx_path), "tokenizer": tmp}, code_paths=[_package_dir()],
            model_config=config, pip_requirements=pip_requirements(*SERVING_PACKAGES))


def log_reward_model(onnx_path: Path, reward_dir: Path, model_config: dict[str, Any], name: str = "reward_serving"):
    """Log the ONNX reward model as an `OnnxRewardModel` pyfunc to the active run; returns the ModelInfo."""
    from alignpipe.lm.tokenizers import load_tokenizer
    from alignpipe.tracking.registry import pip_requirements

    with tempfile.TemporaryDirectory() as tmp:
        load_tokenizer(reward_dir).save_pretrained(tmp)
        return mlflow.pyfunc.log_model(
            name=name, python_model=OnnxRewardModel(), artifacts={"reward_onnx": str(onnx_path), "tokenizer": tmp},
            code_paths=[_package_dir()], model_config={**REWARD_DEFAULTS, **model_config},
            pip_requirements=pip_requirements(*SERVING_PACKAGES))


def _package_dir() -> str:
    """This package's source folder, shipped with the model (code_paths) so a serving image needs no wheel."""
    import alignpipe

    return str(Path(alignpipe.__file__).parent)
