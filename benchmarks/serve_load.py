"""Load test of the model servers: N requests from C concurrent clients (stdlib threads + urllib), servers measured
one after the other in the same run, with the same prompts and the same request settings.

    python benchmarks/serve_load.py --compare --out benchmarks/results/serve_load.md   # the champion, three ways
    python benchmarks/serve_load.py http://127.0.0.1:5001                             # a server you started

`--compare` (uses MLFLOW_TRACKING_URI) starts and measures, in turn: `alignpipe serve
models:/alignpipe-policy-onnx@champion` (OpenAI /v1/completions: 16 clients, 1 client, and 16 clients with
`stream: true` for the time to first token), then `mlflow models serve` of the same ONNX pyfunc and of the
transformers flavor `alignpipe-policy@champion` (16 clients each). `--openai URI` and `--serve URI` pick servers
by hand (repeatable). Each request is one held-out prompt (prompts cycle through data/prompts.jsonl): POST
/v1/completions {"model", "prompt"} or POST /invocations {"inputs": [prompt]}, sampled with the registered settings.
Prints requests/s, p50/p95/p99 latency, time to first token (streamed rows: the first event that carries text, or
the last one for an empty answer), the error count (non-200 answers, bad bodies, timeouts), generated tokens/s
(answers re-tokenized with --tokenizer), the server's and the client's CPU ms per request and the 1-minute load
average sampled during the run; `--out FILE.md` also writes them as Markdown with the ratios the serving targets
name. Each client thread keeps its connection alive, as the `openai` client does; `--no-mlflow` skips the two
`mlflow models serve` rows of --compare.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from alignpipe.serving.server import start_server, stop_server, wait_ready

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/machine.py, also when tests import this
from machine import cpu_name  # noqa: E402

FALLBACK_PROMPTS = ["def add(a, b):", "for i in range(10):", "import os", "class Config:", "x = [1, 2,"]


def load_prompts(path: str | None) -> list[str]:
    """The `prompt` fields of a JSONL file (the fallback prompts when no file is given or found)."""
    if not path or not Path(path).is_file():
        return list(FALLBACK_PROMPTS)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


_local = threading.local()  # each client thread's open connections (HTTP keep-alive, as OpenAI's client keeps them)


def _connection(url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    conns = _local.__dict__.setdefault("conns", {})
    key = (parts.hostname, parts.port, timeout)
    if key not in conns:
        conns[key] = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    return conns[key]


def post(url: str, path: str, body: bytes, timeout: float) -> http.client.HTTPResponse:
    """POST `body` (JSON) on this thread's kept-alive connection to `url`; a connection the server closed while
    idle is reopened once (nothing of the request was answered)."""
    for attempt in (0, 1):
        conn = _connection(url, timeout)
        reused = conn.sock is not None
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            return conn.getresponse()
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            conn.close()
            if not reused or attempt:
                raise
    raise AssertionError("unreachable")


def one_request(url: str, prompt: str, params: dict | None, timeout: float,
                api: str = "mlflow") -> tuple[float, str | None, str, float | None]:
    """(latency in s, error or None, the answer, time to first token in s or None) of one request: POST
    /invocations (`api` mlflow), POST /v1/completions (`openai`; `params` holds "model" and OpenAI fields) or the
    same streamed (`openai-stream`), on the client thread's kept-alive connection."""
    if api == "mlflow":
        body: dict = {"inputs": [prompt], **({"params": params} if params else {})}
        path = "/invocations"
    else:
        body = {**(params or {}), "prompt": prompt, **({"stream": True} if api == "openai-stream" else {})}
        path = "/v1/completions"
    start = time.perf_counter()
    text, first = "", None
    try:
        r = post(url, path, json.dumps(body).encode(), timeout)
        if r.status >= 400:
            r.read()
            error = f"HTTP {r.status}"
        elif api == "openai-stream":
            text, first, error = _read_stream(r, start)
            r.read()  # the rest of the chunked body, so the connection can be reused
        else:
            answer = json.loads(r.read())
            text, error = _answer(answer, api)
    except (http.client.HTTPException, OSError, ValueError) as e:
        _connection(url, timeout).close()
        error = type(e).__name__
    return time.perf_counter() - start, error, text, first


def _answer(answer: dict, api: str) -> tuple[str, str | None]:
    """(the one answer, error or None) of a JSON body."""
    if api == "mlflow":
        ok = isinstance(answer.get("predictions"), list) and len(answer["predictions"]) == 1 \
            and isinstance(answer["predictions"][0], str)
        return (answer["predictions"][0], None) if ok else ("", f"unexpected body {str(answer)[:80]}")
    choices = answer.get("choices")
    ok = isinstance(choices, list) and len(choices) == 1 and isinstance(choices[0].get("text"), str)
    return (choices[0]["text"], None) if ok else ("", f"unexpected body {str(answer)[:80]}")


def _read_stream(response, start: float) -> tuple[str, float | None, str | None]:
    """(the streamed text, seconds to the first event carrying text (or to the finish), error or None)."""
    parts, first, done = [], None, False
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        event = json.loads(line[len("data: "):])
        if "error" in event:
            return "".join(parts), first, f"stream error {event['error'].get('code')}"
        choice = (event.get("choices") or [{}])[0]
        if first is None and (choice.get("text") or choice.get("finish_reason")):
            first = time.perf_counter() - start
        parts.append(choice.get("text") or "")
    return "".join(parts), first, None if done else "stream ended without [DONE]"


class LoadSampler:
    """The 1-minute load average, sampled every second while a run lasts."""

    def __init__(self):
        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.wait(1.0):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])


def _quantiles(values: list[float]) -> list[float]:
    values = sorted(values)
    return statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99


def session_cpu_seconds(sid: int | None) -> float | None:
    """CPU seconds (user + system) used so far by the live processes of session `sid` (a server started in its
    own session: its workers included), from /proc; None without /proc or `sid`."""
    if sid is None or not Path("/proc/self/stat").is_file():
        return None
    total, tick = 0, os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended
            continue
        if int(fields[3]) == sid:  # fields after the name: state, ppid, pgrp, session, ..., utime (12), stime (13)
            total += int(fields[11]) + int(fields[12])
    return total / tick


def run_load(url: str, prompts: list[str], n_requests: int = 1000, concurrency: int = 16,
             params: dict | None = None, timeout: float = 120.0, api: str = "mlflow",
             server_sid: int | None = None) -> dict:
    """Send `n_requests` requests with `concurrency` client threads; returns throughput, latency, time to first
    token (streamed requests), errors, the answers (`answers`, in request order) and the CPU milliseconds per
    request of the server (the processes of session `server_sid`) and of this client."""
    with LoadSampler() as load:
        server_cpu, client_cpu = session_cpu_seconds(server_sid), time.process_time()
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(lambda i: one_request(url, prompts[i % len(prompts)], params, timeout, api),
                                    range(n_requests)))
        wall = time.perf_counter() - start
        client_cpu = time.process_time() - client_cpu
        if server_cpu is not None:
            server_cpu = session_cpu_seconds(server_sid) - server_cpu
    q = _quantiles([r[0] for r in results])
    errors = [r[1] for r in results if r[1] is not None]
    firsts = [r[3] for r in results if r[3] is not None]
    ttft = _quantiles(firsts) if firsts else None
    return {"requests": n_requests, "concurrency": concurrency, "seconds": wall,
            "requests_per_s": n_requests / wall, "p50_ms": 1000 * q[49], "p95_ms": 1000 * q[94],
            "p99_ms": 1000 * q[98], "mean_ms": 1000 * statistics.fmean(r[0] for r in results),
            "ttft_p50_ms": 1000 * ttft[49] if ttft else None, "ttft_p99_ms": 1000 * ttft[98] if ttft else None,
            "errors": len(errors), "error_kinds": sorted(set(errors)), "answers": [r[2] for r in results],
            "load_mean": statistics.fmean(load.samples), "load_max": max(load.samples),
            "server_cpu_ms": 1000 * server_cpu / n_requests if server_cpu is not None else None,
            "client_cpu_ms": 1000 * client_cpu / n_requests}


def add_tokens(stats: dict, tokenizer) -> None:
    """Generated tokens per answer and per second (answers re-tokenized: a server that strips whitespace
    returns fewer tokens than it generated)."""
    n = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in stats["answers"]) if tokenizer else 0
    stats["tokens_per_answer"] = n / max(len(stats["answers"]), 1) if tokenizer else None
    stats["tokens_per_s"] = n / stats["seconds"] if tokenizer else None


def markdown(rows: list[tuple[str, dict]], setup: dict) -> str:
    lines = ["# Serving load benchmark", "", "`python benchmarks/serve_load.py " + setup["argv"] + "`", ""]
    lines += [f"- {k}: {v}" for k, v in setup.items() if k != "argv"]
    lines += ["", "| server | requests | clients | wall s | requests/s | p50 ms | p95 ms | p99 ms | TTFT p50 / p99 ms | "
              "errors | tokens/answer | tokens/s | CPU ms/request server / client | load avg mean / max |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, st in rows:
        tok = (f"{st['tokens_per_answer']:.1f} | {st['tokens_per_s']:.0f}" if st.get("tokens_per_s") is not None
               else "n/a | n/a")
        ttft = f"{st['ttft_p50_ms']:.0f} / {st['ttft_p99_ms']:.0f}" if st.get("ttft_p50_ms") is not None else "n/a"
        cpu = (f"{st['server_cpu_ms']:.1f}" if st.get("server_cpu_ms") is not None else "n/a") + \
            (f" / {st['client_cpu_ms']:.1f}" if st.get("client_cpu_ms") is not None else "")
        lines.append(f"| {name} | {st['requests']} | {st['concurrency']} | {st['seconds']:.1f} | "
                     f"{st['requests_per_s']:.1f} | {st['p50_ms']:.0f} | {st['p95_ms']:.0f} | {st['p99_ms']:.0f} | "
                     f"{ttft} | {st['errors']} | {tok} | {cpu} | {st['load_mean']:.1f} / {st['load_max']:.1f} |")
    lines.append("")
    lines += [f"- {line}" for line in ratios(rows)] + [""]
    for name, st in rows:
        if st["error_kinds"]:
            lines += [f"Errors of {name}: {', '.join(st['error_kinds'])}", ""]
    return "\n".join(lines)


def ratios(rows: list[tuple[str, dict]]) -> list[str]:
    """The comparisons issue 27's targets name, from the rows of a --compare run."""
    by = {name: st for name, st in rows}
    new16, new1 = by.get(f"{OPENAI_ROW}, 16 clients"), by.get(f"{OPENAI_ROW}, 1 client")
    flavor = next((st for name, st in rows if name.startswith(f"mlflow models serve -m {TORCH_URI}")), None)
    out = []
    if new16 and flavor:
        out.append(f"alignpipe serve / transformers flavor, 16 clients: "
                   f"{new16['requests_per_s'] / flavor['requests_per_s']:.1f}x requests/s (target >= 20x)")
    if new16 and new1:
        out.append(f"alignpipe serve, 16 clients / 1 client: {new16['requests_per_s'] / new1['requests_per_s']:.1f}x "
                   "requests/s (target >= 3x)")
    return out


DEFAULT_TOKENIZER = "artifacts/export/policy_tokenizer"  # what `make run` leaves
ONNX_URI, TORCH_URI = "models:/alignpipe-policy-onnx@champion", "models:/alignpipe-policy@champion"
OPENAI_ROW = f"alignpipe serve {ONNX_URI}"


def plan(args) -> list[tuple[str, str, str, int]]:
    """(row name, how to start: openai|mlflow|url, target, clients) of each measured row."""
    c = args.concurrency
    if args.compare:
        return [(f"{OPENAI_ROW}, {c} clients", "openai", ONNX_URI, c),
                (f"{OPENAI_ROW}, 1 client", "openai", ONNX_URI, 1),
                (f"{OPENAI_ROW}, {c} clients, stream", "openai-stream", ONNX_URI, c),
                (f"mlflow models serve -m {ONNX_URI}", "mlflow", ONNX_URI, c),
                (f"mlflow models serve -m {TORCH_URI}", "mlflow", TORCH_URI, c)][:3 if args.no_mlflow else 5]
    rows = [(f"alignpipe serve {t}", "openai", t, c) for t in args.openai]
    rows += [(f"mlflow models serve -m {t}", "mlflow", t, c) for t in args.serve]
    return rows or [(args.url, "url", args.url.rstrip("/"), c)]


def score_speed(url: str, prompts: list[str], reward_dir: str | None, batch: int = 8, repeats: int = 30) -> dict:
    """Reward scoring at batch `batch`: the median ms of one POST /v1/score of `batch` pairs (sequential requests)
    and, given `reward_dir` (the PyTorch reward model), of PyTorch eager `reward_scores` on the same pairs."""
    pairs = [{"prompt": p, "completion": "\n    return None"} for p in prompts[:batch]]
    body = json.dumps({"input": pairs}).encode()

    def served():
        r = post(url, "/v1/score", body, 60.0)
        assert r.status == 200 and len(json.loads(r.read())["data"]) == batch

    fns = {"server": served}
    if reward_dir:
        import torch

        from alignpipe.lm.reward_model import load_reward_model, reward_scores

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        model, tok = load_reward_model(reward_dir, device="cpu")
        fns["eager"] = lambda: reward_scores(model, tok, [p["prompt"] for p in pairs],
                                             [p["completion"] for p in pairs], batch_size=batch)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):  # taking turns, so a change of load hits both alike
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    out = {f"{k}_ms": 1000 * statistics.median(v[1:]) for k, v in times.items()}
    if "eager_ms" in out:
        out["speedup"] = out["eager_ms"] / out["server_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", default="http://127.0.0.1:5001", help="server base URL (MLflow protocol)")
    parser.add_argument("--compare", action="store_true", help="the champion three ways (module docstring)")
    parser.add_argument("--openai", metavar="MODEL_URI", action="append", default=[],
                        help="start `alignpipe serve MODEL_URI` on a free port and measure it (repeatable)")
    parser.add_argument("--serve", metavar="MODEL_URI", action="append", default=[],
                        help="start `mlflow models serve -m MODEL_URI` (local env) on a free port, measure it, then "
                        "stop it (uses MLFLOW_TRACKING_URI); repeat to compare servers in one run")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of `mlflow models serve`")
    parser.add_argument("--requests", type=int, default=1000, help="requests per row (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--prompts", default="data/prompts.jsonl", help="JSONL with 'prompt' (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, help="request max_new_tokens / max_tokens (default: the model's)")
    parser.add_argument("--tokenizer", help="tokenizer directory to count generated tokens (tokens/s; default: "
                        f"{DEFAULT_TOKENIZER}, when present)")
    parser.add_argument("--warmup", type=int, default=16, help="requests sent before timing (default: %(default)s)")
    parser.add_argument("--reward-dir", default="artifacts/reward", help="PyTorch reward model for the eager "
                        "reference of --compare's reward scoring row (default: %(default)s, when present)")
    parser.add_argument("--no-mlflow", action="store_true", help="with --compare: only the `alignpipe serve` rows "
                        "(and reward scoring), not the two `mlflow models serve` rows")
    parser.add_argument("--serve-flag", action="append", default=[], metavar="FLAG",
                        help="extra flag for the started `alignpipe serve` (repeatable, e.g. --serve-flag=--workers=1)")
    parser.add_argument("--out", help="also write the results as Markdown to this file")
    args = parser.parse_args(argv)

    from alignpipe.tracking.runs import tracking_uri

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri()  # the servers started below read the same registry
    prompts = load_prompts(args.prompts)
    tokenizer = None
    if args.tokenizer is None and Path(DEFAULT_TOKENIZER).is_dir():
        args.tokenizer = DEFAULT_TOKENIZER
    if args.tokenizer:
        from alignpipe.lm.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    rows, ready, servers, scoring = [], {}, {}, {}
    try:
        for name, kind, target, clients in plan(args):
            api = "openai-stream" if kind == "openai-stream" else "openai" if kind == "openai" else "mlflow"
            key = ("openai" if api != "mlflow" else "mlflow", target)
            if kind != "url" and key not in servers:
                for old in list(servers):  # one server at a time: each row gets the CPUs
                    stop_server(servers.pop(old)[0])
                log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve_load_{os.getpid()}_{len(rows)}.log"
                proc, url = start_server(target, args.workers, log_path, openai=key[0] == "openai",
                                         extra=tuple(args.serve_flag) if key[0] == "openai" else ())
                servers[key] = (proc, url)
                ready[name] = wait_ready(url, proc=proc)
                print(f"started {name.split(',')[0]} at {url} (log: {log_path}; ready after {ready[name]:.1f} s)",
                      flush=True)
            proc, url = servers.get(key, (None, target))
            params = _params(url, api, args.max_new_tokens)
            if args.warmup:
                run_load(url, prompts, args.warmup, min(clients, args.warmup), params, api=api)
            stats = run_load(url, prompts, args.requests, clients, params, api=api, server_sid=proc and proc.pid)
            if args.compare and api == "openai" and clients == 1:  # the ONNX reward model, through the server
                scoring = score_speed(url, prompts, args.reward_dir if Path(args.reward_dir).is_dir() else None)
                print("reward scoring, batch 8: " + ", ".join(f"{k} {v:.2f}" for k, v in scoring.items()), flush=True)
            add_tokens(stats, tokenizer)
            rows.append((name, stats))
            print(f"{name}: {stats['requests']} requests, {clients} clients, {stats['seconds']:.1f} s: "
                  f"{stats['requests_per_s']:.1f} requests/s, p50 {stats['p50_ms']:.0f} ms, p95 "
                  f"{stats['p95_ms']:.0f} ms, p99 {stats['p99_ms']:.0f} ms"
                  + (f", TTFT p50 {stats['ttft_p50_ms']:.0f} ms p99 {stats['ttft_p99_ms']:.0f} ms"
                     if stats["ttft_p50_ms"] is not None else "")
                  + f", errors {stats['errors']}" + (f" ({', '.join(stats['error_kinds'])})" if stats["errors"] else "")
                  + (f", {stats['tokens_per_s']:.0f} tokens/s" if stats["tokens_per_s"] is not None else "")
                  + (f", server CPU {stats['server_cpu_ms']:.1f} ms/request" if stats["server_cpu_ms"] is not None
                     else "") + f", client CPU {stats['client_cpu_ms']:.1f} ms/request"
                  + f", load average {stats['load_mean']:.1f} (max {stats['load_max']:.1f})", flush=True)
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    for line in ratios(rows):
        print(line)
    if args.out:
        setup = {"argv": " ".join(argv if argv is not None else sys.argv[1:]),
                 "servers": "; ".join(f"{n} (ready after {s:.1f} s)" for n, s in ready.items()) or args.url,
                 "mlflow models serve": f"--env-manager local --workers {args.workers}",
                 "prompts": f"{args.prompts} ({len(prompts)} prompts, cycled), one prompt per request, sampled with "
                            "the registered settings",
                 "max_new_tokens": args.max_new_tokens or "model default",
                 "machine": f"{platform.machine()}, {cpu_name()}, {os.cpu_count()} CPUs, "
                            f"Python {platform.python_version()}; uptime at the end: {_uptime()}"}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        if scoring:
            eager = (f"; PyTorch eager reward_scores on the same 8: {scoring['eager_ms']:.1f} ms, "
                     f"{scoring['speedup']:.1f}x (target >= 2x)" if "eager_ms" in scoring else "")
            setup["reward scoring, POST /v1/score of 8 pairs (median of sequential requests)"] = (
                f"{scoring['server_ms']:.1f} ms{eager}")
        Path(args.out).write_text(markdown(rows, setup), encoding="utf-8")
    return 0 if all(st["errors"] == 0 for _, st in rows) else 1


def _params(url: str, api: str, max_new_tokens: int | None) -> dict | None:
    """Request settings: the served model's id (GET /v1/models) for the OpenAI routes; the token cap if given."""
    if api == "mlflow":
        return {"max_new_tokens": max_new_tokens} if max_new_tokens else None
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as r:
        model = json.loads(r.read())["data"][0]["id"]
    return {"model": model, **({"max_tokens": max_new_tokens} if max_new_tokens else {})}


def _uptime() -> str:
    import subprocess

    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
