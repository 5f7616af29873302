"""The OpenAI-compatible HTTP server of `alignpipe serve MODEL_URI`: FastAPI routes over one continuous-batching
`Engine` (`alignpipe.serving.engine`).

Routes: `POST /v1/completions` (text tasks: the task's verbatim completion, as evaluate scores it),
`POST /v1/chat/completions` (chat tasks: messages through the chat template, the end-of-turn stop), `GET /v1/models`,
`POST /v1/score` (the ONNX reward model, batched), `GET /health` (the process is up) and `GET /ready` (also `/ping`:
the model is loaded and the decoder loop runs). `stream: true` answers as server-sent events in OpenAI's chunk format,
ending with `data: [DONE]`.

Every request goes through `parse` (one place): the body read up to `Limits.max_body_bytes` (413), JSON, then a
strict pydantic model per route (unknown fields, wrong types, NaN/inf and out-of-range numbers: 400 naming the
field), then the limits on prompts, characters and choices (400) and the tokenizer's special tokens in user text
(400: content never becomes structure). Errors are OpenAI's error object `{"error": {"message", "type", "param",
"code"}}`. A full queue answers 503 with Retry-After; a request past its deadline, 504.

Chosen over MLflow's scoring server (no streaming, `/invocations` only, a thread per request), over MLflow's
ChatModel/ResponsesAgent (no /v1/completions, no continuous batching) and over onnxruntime-genai (it runs graphs made
by its own model builder with its genai_config.json, not the export stage's KV-cache graph, and is not in the stack).
"""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request  # at module level: FastAPI resolves the routes' annotations here

from alignpipe.lm.ort_sampling import Decoding
from alignpipe.serving.engine import Engine, Job, QueueFull, TimedOut
from alignpipe.serving.models import MAX_TEMPERATURE


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask (defaults of `alignpipe serve`; its flags override them)."""

    max_body_bytes: int = 1 << 20  # a larger body: 413
    max_prompts: int = 64  # prompts of one /v1/completions request (or pairs of one /v1/score request)
    max_prompt_chars: int = 32_768  # characters of one prompt (all message contents of a chat request)
    max_messages: int = 64  # messages of one chat request
    max_n: int = 8  # choices per prompt
    max_sequences: int = 64  # prompts x n of one request
    timeout_s: float = 60.0  # a request not answered by then: 504
    retry_after_s: int = 1  # the Retry-After of a 503


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
             503: "server_overloaded", 504: "timeout"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------------ request shapes
Temperature = Field(None, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False)
TopP = Field(None, gt=0, le=1, allow_inf_nan=False)
Seed = Field(None, ge=0, lt=2 ** 63)
Stop = str | list[str] | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Temperature  # 0: greedy
    top_p: float | None = TopP
    n: int = Field(1, ge=1)
    stop: Stop = None
    seed: int | None = Seed
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted (OpenAI clients send it), not used


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)


class Pair(_Strict):
    prompt: str | list[Message]
    completion: str


class ScoreRequest(_Strict):
    model: str | None = None
    input: list[Pair]


def _field(loc: tuple) -> str:
    """A pydantic error location as the request's field path (`messages[0].role`)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "list[Message]", "Message") or str(part).startswith(("list[", "function-")):
            continue  # the union member pydantic tried, not a field
        else:
            out += f".{part}" if out else str(part)
    return out


def parse_body(raw: bytes, shape: type[BaseModel]):
    """The request as `shape`, or ApiError(400) naming the first bad field."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return shape.model_validate(data)
    except ValidationError as e:
        errors = e.errors()  # of a union, the member that got deepest says most
        err = max(errors, key=lambda x: len(_field(x["loc"])))
        param = _field(err["loc"])
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"unknown field '{param}'", param, "unknown_field") from None
        if err["type"] == "missing":
            raise ApiError(400, f"'{param}' is required", param, "missing_field") from None
        value = err.get("input")
        shown = repr(value) if isinstance(value, (int, float, bool, type(None))) else type(value).__name__
        raise ApiError(400, f"{param}: {err['msg'].lower()} (got {shown})", param, "invalid_value") from None


# ----------------------------------------------------------------------------------------------------- the app
class Server:
    """The routes' logic over one engine (and reward scorer), independent of the HTTP framework's objects."""

    def __init__(self, served, engine: Engine, scorer=None, limits: Limits = Limits()):
        self.served, self.engine, self.scorer, self.limits = served, engine, scorer, limits
        self.config = served.config
        self.cap = int(self.config["max_new_tokens"])
        self.chat = engine.completer.task.conversational()
        tok = engine.completer.tok
        self.special = sorted({t for t in [*tok.all_special_tokens, *getattr(tok, "added_tokens_encoder", {})] if t},
                              key=len, reverse=True)
        self.seeds = np.random.SeedSequence()  # unseeded requests: fresh entropy per job
        self.created = int(time.time())

    # ------------------------------------------------------------------------------------------- validation
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served.name:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{self.served.name}'",
                           "model", "model_not_found")

    def check_text(self, text: str, param: str) -> None:
        if len(text) > self.limits.max_prompt_chars:
            raise ApiError(400, f"{param} is {len(text)} characters; the limit is {self.limits.max_prompt_chars}",
                           param, "prompt_too_long")
        forged = next((s for s in self.special if s in text), None)
        if forged is not None:
            raise ApiError(400, f"{param} holds the model's special token {forged!r}: user text may not contain "
                           "control or template tokens", param, "special_token")

    def decoding(self, req: _Sampling, max_tokens: int | None) -> tuple[Decoding, tuple[str, ...]]:
        if req.n > self.limits.max_n:
            raise ApiError(400, f"n must be <= {self.limits.max_n}, got {req.n}", "n")
        if max_tokens is not None and max_tokens > self.cap:
            raise ApiError(400, f"max_tokens must be <= {self.cap} (the served model's cap), got {max_tokens}",
                           "max_tokens")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stop) > 4 or any(not s or len(s) > 64 for s in stop):
            raise ApiError(400, "stop: up to 4 non-empty strings of at most 64 characters", "stop")
        temperature = float(self.config["temperature"] if req.temperature is None else req.temperature)
        top_p = float(self.config["top_p"] if req.top_p is None else req.top_p)
        greedy = temperature == 0 or (req.temperature is None and not self.config.get("do_sample", True))
        return Decoding(max_tokens or self.cap, not greedy, temperature if not greedy else 1.0, top_p), stop

    # ----------------------------------------------------------------------------------------------- routes
    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.served.name, "object": "model", "created": self.created,
                                            "owned_by": "alignpipe", "task": self.served.task}]}

    def completion_jobs(self, req: CompletionRequest):
        self.check_model(req.model)
        if self.chat:
            raise ApiError(400, f"'{self.served.name}' is a chat model: use /v1/chat/completions", "prompt",
                           "wrong_endpoint")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts or len(prompts) > self.limits.max_prompts:
            raise ApiError(400, f"prompt: 1 to {self.limits.max_prompts} prompts per request, got {len(prompts)}",
                           "prompt")
        for i, p in enumerate(prompts):
            if not p.strip():
                raise ApiError(400, f"prompt[{i}] is blank", "prompt")
            self.check_text(p, "prompt" if isinstance(req.prompt, str) else f"prompt[{i}]")
        return prompts, *self.decoding(req, req.max_tokens)

    def chat_jobs(self, req: ChatRequest):
        from alignpipe.data.validators import PROMPT_TURNS, TURN_RULES

        self.check_model(req.model)
        if not self.chat:
            raise ApiError(400, f"'{self.served.name}' completes text ({self.served.task}): use /v1/completions",
                           "messages", "wrong_endpoint")
        if not req.messages or len(req.messages) > self.limits.max_messages:
            raise ApiError(400, f"messages: 1 to {self.limits.max_messages} messages, got {len(req.messages)}",
                           "messages")
        for i, m in enumerate(req.messages):
            if not m.content.strip():
                raise ApiError(400, f"messages[{i}].content is blank", f"messages[{i}].content")
            self.check_text(m.content, f"messages[{i}].content")
        self.check_text("".join(m.content for m in req.messages), "messages")
        roles = ",".join(m.role for m in req.messages)
        if not re.match(PROMPT_TURNS, roles):
            raise ApiError(400, f"messages: {TURN_RULES[PROMPT_TURNS]}; got roles {roles}", "messages")
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise ApiError(400, "give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
        conversation = [{"role": m.role, "content": m.content} for m in req.messages]
        return [conversation], *self.decoding(req, req.max_completion_tokens or req.max_tokens)

    async def generate(self, prompts: list, decoding: Decoding, stop: tuple[str, ...], req: _Sampling,
                       stream: bool):
        """Queue one job per prompt and choice; returns (jobs, prompt token counts, event queue)."""
        if len(prompts) * req.n > self.limits.max_sequences:
            raise ApiError(400, f"prompts x n is {len(prompts) * req.n}; the limit is {self.limits.max_sequences}",
                           "n")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:  # off the event loop: a long prompt list takes a while to tokenize
            encoded = await run_in_threadpool(self.engine.encode, prompts)
        except Exception as e:  # a chat template that fails on these messages, a tokenizer error
            raise ApiError(400, f"the prompt cannot be formatted for this model: {type(e).__name__}: {e}",
                           "messages" if self.chat else "prompt") from None
        deadline = time.monotonic() + self.limits.timeout_s
        jobs = []
        for i, ids in enumerate(encoded):
            if not ids:
                raise ApiError(400, f"prompt {i} tokenizes to nothing", "prompt")
            for j in range(req.n):
                index = i * req.n + j

                def emit(kind, job, index=index):  # decoder thread -> this request's event loop
                    loop.call_soon_threadsafe(events.put_nowait, (kind, index, job.delta))

                seed = np.random.SeedSequence([req.seed, index]) if req.seed is not None else self.seeds.spawn(1)[0]
                jobs.append(Job(ids, decoding, np.random.default_rng(seed), emit, deadline, stop, stream))
        try:
            self.engine.submit(jobs)
        except QueueFull as e:
            raise ApiError(503, f"the server is busy: {e}; retry later", None, "queue_full",
                           {"Retry-After": str(self.limits.retry_after_s)}) from None
        return jobs, [len(x) for x in encoded], events

    async def wait(self, jobs: list[Job], events: asyncio.Queue) -> None:
        """Until every job is done; ApiError(504) past the deadline (the other jobs cancelled)."""
        left = len(jobs)
        try:
            while left:
                kind, index, _ = await asyncio.wait_for(events.get(), self.limits.timeout_s + 5)
                if kind == "error":
                    raise self.job_error(jobs[index])
                left -= kind == "done"
        except asyncio.TimeoutError:
            raise ApiError(504, f"no answer within {self.limits.timeout_s:g} s", None, "timeout") from None
        finally:
            for job in jobs:
                job.cancelled = job.finish_reason is None

    def job_error(self, job: Job) -> ApiError:
        if isinstance(job.error, TimedOut):
            return ApiError(504, f"the request was not answered within {self.limits.timeout_s:g} s (the server is "
                            "overloaded)", None, "timeout")
        return ApiError(500, f"generation failed: {type(job.error).__name__}: {job.error}", None, "internal_error")

    def usage(self, jobs: list[Job], prompt_tokens: list[int]) -> dict[str, int]:
        completion = sum(len(j.new) for j in jobs)
        return {"prompt_tokens": sum(prompt_tokens), "completion_tokens": completion,
                "total_tokens": sum(prompt_tokens) + completion}

    def score(self, req: ScoreRequest) -> dict[str, Any]:
        self.check_model(req.model)
        if self.scorer is None:
            raise ApiError(404, f"no reward model is served: {self.served.no_reward}", None, "no_reward_model")
        if not req.input or len(req.input) > self.limits.max_prompts:
            raise ApiError(400, f"input: 1 to {self.limits.max_prompts} pairs, got {len(req.input)}", "input")
        pairs = []
        for i, pair in enumerate(req.input):
            prompt = pair.prompt if isinstance(pair.prompt, str) else [m.model_dump(exclude_none=True)
                                                                     for m in pair.prompt]
            for text, param in ((prompt if isinstance(prompt, str) else "".join(m["content"] for m in prompt),
                                 f"input[{i}].prompt"), (pair.completion, f"input[{i}].completion")):
                self.check_text(text, param)
            pairs.append((prompt, pair.completion))
        scores = self.scorer.submit(None, pairs)
        return {"object": "list", "model": self.served.name,
                "data": [{"object": "score", "index": i, "score": s} for i, s in enumerate(scores)]}


def _sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def create_app(server: Server):
    """The FastAPI app of `server`."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="alignpipe", docs_url=None, redoc_url=None, openapi_url=None)
    limits = server.limits

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(404)
    async def not_found(request, e):
        return JSONResponse(ApiError(404, f"no route {request.method} {request.url.path}", None,
                                     "not_found").body(), status_code=404)

    @app.exception_handler(405)
    async def wrong_method(request, e):
        return JSONResponse({"error": {"message": f"{request.method} is not allowed on {request.url.path}",
                                       "type": "invalid_request_error", "param": None, "code": "method_not_allowed"}},
                            status_code=405)

    async def read(request: Request, shape: type[BaseModel]):
        """The body, at most `max_body_bytes` (413 past it, before reading more), parsed as `shape`."""
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limits.max_body_bytes):
            raise ApiError(413, f"the body is {declared} bytes; the limit is {limits.max_body_bytes}", None,
                           "body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise ApiError(413, f"the body exceeds {limits.max_body_bytes} bytes", None, "body_too_large")
            chunks.append(chunk)
        return parse_body(b"".join(chunks), shape)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    @app.get("/ping")
    async def ready():
        if not server.engine.alive():
            return JSONResponse({"status": "not ready"}, status_code=503)
        return {"status": "ready", "model": server.served.name, "queued": len(server.engine.pending),
                "running": server.engine.live()}

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read(request, CompletionRequest)
        prompts, decoding, stop = server.completion_jobs(req)
        return await answer(req, prompts, decoding, stop, "text_completion", "cmpl")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read(request, ChatRequest)
        prompts, decoding, stop = server.chat_jobs(req)
        return await answer(req, prompts, decoding, stop, "chat.completion", "chatcmpl")

    @app.post("/v1/score")
    async def score(request: Request):
        req = await read(request, ScoreRequest)
        return await run_in_threadpool(server.score, req)

    async def answer(req: _Sampling, prompts, decoding, stop, kind: str, prefix: str):
        jobs, prompt_tokens, events = await server.generate(prompts, decoding, stop, req, req.stream)
        head = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.served.name}
        chat = kind == "chat.completion"
        if not req.stream:
            await server.wait(jobs, events)
            choices = [{"index": i, "finish_reason": j.finish_reason, "logprobs": None,
                        **({"message": {"role": "assistant", "content": j.text}} if chat else {"text": j.text})}
                       for i, j in enumerate(jobs)]
            return {**head, "object": kind, "choices": choices, "usage": server.usage(jobs, prompt_tokens)}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(stream(jobs, prompt_tokens, events, head, chat, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def stream(jobs, prompt_tokens, events, head, chat: bool, include_usage: bool):
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(index: int, text: str | None, finish: str | None, first: bool = False):
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else
                         {"content": text} if text else {})
                return _sse({**head, "choices": [{"index": index, "delta": delta, "finish_reason": finish,
                                                  "logprobs": None}]})
            return _sse({**head, "choices": [{"index": index, "text": text or "", "finish_reason": finish,
                                              "logprobs": None}]})

        try:
            if chat:
                for i in range(len(jobs)):
                    yield chunk(i, None, None, first=True)
            left = len(jobs)
            while left:
                try:
                    kind, index, delta = await asyncio.wait_for(events.get(), limits.timeout_s + 5)
                except asyncio.TimeoutError:
                    yield _sse(ApiError(504, "no answer in time", None, "timeout").body())
                    return
                job = jobs[index]
                if kind == "error":
                    yield _sse(server.job_error(job).body())
                    return
                if kind == "delta":
                    yield chunk(index, delta, None)
                else:
                    rest = job.text[len(job.sent):] if job.text.startswith(job.sent) else ""
                    yield chunk(index, rest or None, job.finish_reason)
                    left -= 1
            if include_usage:
                yield _sse({**head, "choices": [], "usage": server.usage(jobs, prompt_tokens)})
            yield _sse("[DONE]")
        finally:
            for job in jobs:
                job.cancelled = job.finish_reason is None

    return app



def build_server(served, threads: int, max_batch_size: int, max_queue: int, limits: Limits = Limits(),
                 graph: Path | None = None) -> Server:
    """The engine (ORT session with `threads` intra-op threads, no spinning) over `graph` (default: the policy's
    graph with last-position logits, `alignpipe.serving.graph`), the reward scorer when `served` has a reward
    model, and the Server over them."""
    from alignpipe.lm.onnx_runtime import OrtPolicy
    from alignpipe.lm.ort_sampling import OrtCompleter
    from alignpipe.lm.policy import PolicyMeta
    from alignpipe.lm.tokenizers import load_tokenizer
    from alignpipe.serving.graph import serving_graph
    from alignpipe.serving.models import RewardScorer, _session
    from alignpipe.tasks import get_task

    session_config = {**served.config, "intra_op_threads": threads, "spin": False}
    if graph is None:  # logits of the last position only
        workdir = served.workdir.name if served.workdir is not None else tempfile.mkdtemp(prefix="alignpipe-")
        graph = serving_graph(served.policy_onnx, Path(workdir))
    completer = OrtCompleter(OrtPolicy(_session(str(graph), session_config)),
                             load_tokenizer(served.tokenizer), PolicyMeta.load(served.tokenizer),
                             int(served.config["max_prompt_tokens"]), get_task(served.task))
    scorer = None
    if served.reward_onnx is not None:
        # No batching window: a request runs at once, and those that arrive meanwhile share the next run. One
        # intra-op thread per worker: a batch of 8 pairs took 3.8 ms with 1 thread, 4.0 with 2, 8.0 with 2 spinning.
        scorer = RewardScorer(str(served.reward_onnx), str(served.reward_tokenizer),
                              {**served.reward_config, "intra_op_threads": threads, "spin": False,
                               "max_batch_size": max_batch_size, "batch_window_ms": 0.0}).batcher()
    return Server(served, Engine(completer, max_batch_size, max_queue), scorer, limits)


SPEC_ENV = "ALIGNPIPE_SERVE_SPEC"  # what each worker process of `alignpipe serve --workers N` builds (JSON)


def worker_spec(served, graph: Path, threads: int, max_batch_size: int, max_queue: int, limits: Limits) -> str:
    """The JSON a worker process reads (`app_from_env`) to serve what the parent resolved and checked: the
    files (downloaded once, kept by the parent), settings and limits."""
    from dataclasses import asdict, fields

    keep = {f.name: getattr(served, f.name) for f in fields(served) if f.name != "workdir"}
    return json.dumps({"served": {k: str(v) if isinstance(v, Path) else v for k, v in keep.items()},
                       "graph": str(graph), "threads": threads, "max_batch_size": max_batch_size,
                       "max_queue": max_queue, "limits": asdict(limits)})


def app_from_env():
    """The app of one worker process (uvicorn's factory): the server `worker_spec` describes, in `SPEC_ENV`."""
    import os

    from alignpipe.serving.loading import Served

    spec = json.loads(os.environ[SPEC_ENV])
    data = spec["served"]
    for key in ("policy_onnx", "tokenizer", "reward_onnx", "reward_tokenizer"):
        data[key] = Path(data[key]) if data[key] is not None else None
    server = build_server(Served(**data), spec["threads"], spec["max_batch_size"], spec["max_queue"],
                          Limits(**spec["limits"]), graph=Path(spec["graph"]))
    app = create_app(server)  # the decoder thread is a daemon: it ends with the worker
    freeze_heap()
    return app


def freeze_heap() -> None:
    """Move what loading left on the heap (about 340,000 objects: the imported libraries, the tokenizer) out of
    the garbage collector's reach, so a full collection while serving scans only what serving made (full
    collections during loading took up to 135 ms on the 2-CPU machine: a stall of every request in flight)."""
    import gc

    gc.collect()
    gc.freeze()
