"""MLflow pyfunc serving models that run the exported ONNX graphs with onnxruntime and batch concurrent requests.

`mlflow models serve` calls `predict` from a thread pool (one thread per request in flight), so concurrent
requests meet in a `RequestBatcher`: the first request waits up to `batch_window_ms` for others with the same
settings, and up to `max_batch_size` prompts go through the decoder together. The policy model answers like
`alignpipe.lm.policy.sample` (conditioning, banned tokens, one logical line, whitespace kept); the chat model (a
`ChatModel`: OpenAI's chat-completions request and response) answers a conversation with the assistant's turn like
`alignpipe.oracle.chat_eval.sample_chat`; the reward model scores prompt/completion pairs as
`alignpipe.lm.reward_model.reward_scores` does. Bad requests raise MlflowException(INVALID_PARAMETER_VALUE): the
server answers 400.
"""

from __future__ import annotations

import math
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
                           strict=False, spin=bool(config.get("spin", True)))


def _strings(model_input: Any, what: str) -> list:
    """The request's rows as a list (a DataFrame's first column, or a list), checked non-empty."""
    if hasattr(model_input, "columns"):
        model_input = model_input.iloc[:, 0].tolist() if len(model_input.columns) == 1 else \
            model_input.to_dict("records")
    if not isinstance(model_input, list) or not model_input:
        raise bad_request(f"inputs must be a non-empty list of {what}")
    return model_input


DECODING_PARAMS = ("max_new_tokens", "temperature", "top_p", "do_sample")
MAX_TEMPERATURE = 2.0  # OpenAI's bound: a larger temperature is a uniform draw in all but name
# ChatParams fields the chat model does not implement: refused rather than ignored
UNSUPPORTED_CHAT_PARAMS = ("stop", "top_k", "frequency_penalty", "presence_penalty", "tools", "custom_inputs")


def decoding(config: dict[str, Any], params: dict[str, Any] | None, names: dict[str, str] | None = None):
    """The request's Decoding: the model_config defaults with the request's params, checked; `names` maps a
    Decoding field to the request's name for it in the error line (default `params.<field>`)."""
    from alignpipe.lm.ort_sampling import Decoding

    params = params or {}
    unknown = set(params) - set(DECODING_PARAMS)
    if unknown:
        raise bad_request(f"unknown params {sorted(unknown)}")
    merged = {k: params.get(k, config[k]) for k in DECODING_PARAMS}
    name = {k: (names or {}).get(k, f"params.{k}") for k in DECODING_PARAMS}
    cap = int(config["max_new_tokens"])

    def number(key: str) -> bool:  # NaN and infinities fail every bound below
        value = merged[key]
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if not number("max_new_tokens") or not isinstance(merged["max_new_tokens"], int) \
            or not 1 <= merged["max_new_tokens"] <= cap:
        raise bad_request(f"{name['max_new_tokens']} must be an integer in [1, {cap}], got "
                          f"{merged['max_new_tokens']!r}")
    if not number("temperature") or not 0 < merged["temperature"] <= MAX_TEMPERATURE:
        raise bad_request(f"{name['temperature']} must be > 0 and <= {MAX_TEMPERATURE}, got {merged['temperature']!r}")
    if not number("top_p") or not 0 < merged["top_p"] <= 1:
        raise bad_request(f"{name['top_p']} must be in (0, 1], got {merged['top_p']!r}")
    if not isinstance(merged["do_sample"], bool):
        raise bad_request(f"params.do_sample must be true or false, got {merged['do_sample']!r}")
    return Decoding(int(merged["max_new_tokens"]), bool(merged["do_sample"]), float(merged["temperature"]),
                    float(merged["top_p"]))


def chat_decoding(config: dict[str, Any], params):
    """The Decoding of a chat request's ChatParams: `max_tokens`, `temperature` (0: greedy, as OpenAI's) and
    `top_p`, checked as `decoding` does; a field left None takes the model_config's value."""
    given = [k for k in UNSUPPORTED_CHAT_PARAMS if getattr(params, k) is not None]
    if params.n != 1:
        given.append("n")
    if given:
        raise bad_request(f"unsupported chat params {given} (supported: max_tokens, temperature, top_p)")
    fields = {"max_new_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p}
    request = {k: v for k, v in fields.items() if v is not None}
    if request.get("temperature") == 0:  # OpenAI's greedy
        request["do_sample"] = False
        del request["temperature"]
    elif request.get("temperature", 1) < 0:
        raise bad_request(f"temperature must be >= 0 (0: greedy), got {request['temperature']!r}")
    return decoding(config, request, {"max_new_tokens": "max_tokens", "temperature": "temperature",
                                      "top_p": "top_p"})


def _conversation(messages) -> list[dict[str, str]]:
    """A chat request's ChatMessages as {"role", "content"} dicts, checked as validate checks a prompt: known roles,
    non-blank string contents, turns alternating user/assistant after an optional system turn, ending on a user."""
    import re

    from alignpipe.data.validators import PROMPT_TURNS, ROLES, TURN_RULES, roles_of

    conversation = [{"role": m.role, "content": m.content} for m in messages]
    roles = roles_of(conversation)
    if not roles:
        raise bad_request(f"messages must be a non-empty list of {{\"role\": {'|'.join(ROLES)}, \"content\": "
                          "a non-blank string}")
    if not re.match(PROMPT_TURNS, roles):
        raise bad_request(f"messages: {TURN_RULES[PROMPT_TURNS]}; got roles {roles}")
    return conversation


def _load_policy(model, context, task: str, run: Callable[[Hashable, list], list]) -> None:
    """Give a policy serving model its `config` (POLICY_DEFAULTS, then the model_config), the OrtCompleter of its
    artifacts (policy_onnx, tokenizer with alignpipe.json) for `task`, a seeded `rng` and a `batcher` of
    `run(decoding, prompts)`."""
    import numpy as np

    from alignpipe.lm.onnx_runtime import OrtPolicy
    from alignpipe.lm.ort_sampling import OrtCompleter
    from alignpipe.lm.policy import PolicyMeta
    from alignpipe.lm.tokenizers import load_tokenizer
    from alignpipe.tasks import get_task

    model.config = config = {**POLICY_DEFAULTS, **(context.model_config or {})}
    tok_dir = context.artifacts["tokenizer"]
    model.completer = OrtCompleter(OrtPolicy(_session(context.artifacts["policy_onnx"], config)),
                                   load_tokenizer(tok_dir), PolicyMeta.load(tok_dir), int(config["max_prompt_tokens"]),
                                   get_task(task))
    model.rng = np.random.default_rng(int(config["seed"]))
    model.batcher = RequestBatcher(run, int(config["max_batch_size"]), float(config["batch_window_ms"]) / 1e3)


class OnnxPolicyModel(mlflow.pyfunc.PythonModel):
    """Plain prompt strings in, completions out (one logical line, whitespace kept)."""

    def load_context(self, context):
        _load_policy(self, context, "pep8", lambda key, prompts: self.completer.complete(prompts, key, self.rng))

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        prompts = _strings(model_input, "prompt strings")
        if not all(isinstance(p, str) and p.strip() for p in prompts):
            raise bad_request("every input must be a non-blank prompt string")
        return self.batcher.submit(decoding(self.config, params), prompts)


class OnnxChatModel(mlflow.pyfunc.ChatModel):
    """A conversation ({"role", "content"} messages ending on a user turn) in, the assistant's answer out (its
    turn decoded without special tokens, stripped), through the tokenizer's chat template."""

    def load_context(self, context):  # the task it was logged for (arith, ...; chat before it was recorded)
        _load_policy(self, context, (context.model_config or {}).get("task", "chat"), self._answer)

    def __getstate__(self):  # MLflow pickles the model after a trial predict: the session is rebuilt on load
        return {}

    def _answer(self, decoding, conversations: list) -> list[tuple[str, str]]:
        """(answer, finish reason) per conversation: "stop" at the end of the turn, "length" at the token cap."""
        rows = self.completer.generate(conversations, decoding, self.rng)
        return [(self.completer.finish(r), "stop" if r and r[-1] in self.completer.stops else "length") for r in rows]

    def predict(self, context, messages, params):
        from mlflow.types.llm import ChatChoice, ChatCompletionResponse, ChatMessage

        conversation = _conversation(messages)
        answer, finish = self.batcher.submit(chat_decoding(self.config, params), [conversation])[0]
        return ChatCompletionResponse(choices=[ChatChoice(message=ChatMessage(role="assistant", content=answer),
                                                          finish_reason=finish)])


class RewardScorer:
    """Raw rewards of (prompt, completion) pairs on the ONNX reward graph, computed as
    `alignpipe.lm.reward_model.reward_scores` does (same text, the last `max_length` tokens, right padding)."""

    def __init__(self, onnx_path: str, tokenizer_dir: str, config: dict[str, Any]):
        from alignpipe.lm.onnx_runtime import OrtReward
        from alignpipe.lm.tokenizers import load_tokenizer

        self.config = {**REWARD_DEFAULTS, **config}
        self.tok = load_tokenizer(tokenizer_dir)
        self.prompt_lines = int(self.config.get("prompt_lines", 0))
        self.pad_id = int(self.config.get("pad_token_id", self.tok.pad_token_id))
        self.reward = OrtReward(_session(onnx_path, self.config))

    def score(self, pairs: list[tuple[Any, str]]) -> list[float]:
        from alignpipe.lm.batching import pad
        from alignpipe.lm.reward_model import reward_ids

        max_length = int(self.config["max_length"])
        ids = [reward_ids(p, c, self.tok, self.prompt_lines)[-max_length:] for p, c in pairs]
        input_ids, mask = pad(ids, self.pad_id)  # right padding, as reward_scores and the trainer's collator
        return [float(v) for v in self.reward.score(input_ids, mask)]

    def batcher(self) -> RequestBatcher:
        """Concurrent `submit(None, pairs)` calls merged into batches of up to `max_batch_size` pairs."""
        return RequestBatcher(lambda key, pairs: self.score(pairs), int(self.config["max_batch_size"]),
                              float(self.config["batch_window_ms"]) / 1e3)


def reward_settings(config: dict[str, Any]) -> dict[str, int]:
    """What the served reward model needs from the PyTorch one's config.json: positions, padding id, prompt lines."""
    from alignpipe.lm.reward_model import PROMPT_LINES_KEY

    out = {"max_length": min(256, int(config.get("n_positions") or 256)),
           "prompt_lines": int(config.get(PROMPT_LINES_KEY) or 0)}
    if config.get("pad_token_id") is not None:  # else the tokenizer's, as reward_scores does
        out["pad_token_id"] = int(config["pad_token_id"])
    return out


class OnnxRewardModel(mlflow.pyfunc.PythonModel):
    """{"prompt", "completion"} records in, raw rewards out (higher is better)."""

    def load_context(self, context):
        self.scorer = RewardScorer(context.artifacts["reward_onnx"], context.artifacts["tokenizer"],
                                   context.model_config or {})
        self.batcher = self.scorer.batcher()

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[float]:
        rows = _strings(model_input, "{\"prompt\", \"completion\"} objects")
        pairs = []
        for i, row in enumerate(rows):
            if not (isinstance(row, dict) and isinstance(row.get("prompt"), str)
                    and isinstance(row.get("completion"), str)):
                raise bad_request(f"inputs[{i}] must be an object with string 'prompt' and 'completion'")
            pairs.append((row["prompt"], row["completion"]))
        return self.batcher.submit(None, pairs)


def log_policy_model(onnx_path: Path, policy_dir: Path, model_config: dict[str, Any], name: str = "policy_serving",
                     task: str = "pep8"):
    """Log the ONNX policy to the active run as `task`'s serving model: an `OnnxPolicyModel` pyfunc (prompt
    strings in) or, for a task prompted with messages (chat), an `OnnxChatModel`; returns the ModelInfo."""
    from mlflow.models import infer_signature

    from alignpipe.lm.policy import PolicyMeta
    from alignpipe.lm.tokenizers import load_tokenizer
    from alignpipe.tasks import get_task
    from alignpipe.tracking.registry import pip_requirements

    config = {**POLICY_DEFAULTS, **model_config, "task": task}  # the task tells `alignpipe serve` how to prompt
    if get_task(task).conversational():
        config["task"] = task  # the served model prompts and ends answers as this task does (arith: meta suffix)
        # A ChatModel's signature is MLflow's chat schema; MLflow runs `predict` on the example while logging (its
        # default example asks for `stop`, which this model refuses).
        served = {"python_model": OnnxChatModel(),
                  "input_example": {"messages": [{"role": "user", "content": "Hello!"}]}}
    else:
        # MLflow fills a request's missing params with the signature's values: they must be the model_config's.
        served = {"python_model": OnnxPolicyModel(), "signature": infer_signature(
            ["def add(a, b):"], ["\n    return a + b"], params={k: config[k] for k in DECODING_PARAMS})}
    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer and alignpipe.json, not the PyTorch weights
        load_tokenizer(policy_dir).save_pretrained(tmp)
        PolicyMeta.load(policy_dir).save(tmp)
        return mlflow.pyfunc.log_model(
            name=name, **served, artifacts={"policy_onnx": str(onnx_path), "tokenizer": tmp},
            code_paths=[_package_dir()], model_config=config, pip_requirements=pip_requirements(*SERVING_PACKAGES))


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
