"""Load test of MLflow model servers: N requests from C concurrent clients (stdlib threads + urllib), one or more
servers measured one after the other in the same run, with the same prompts and the same request params.

    python benchmarks/serve_load.py http://127.0.0.1:5001               # a server you started
    python benchmarks/serve_load.py --serve models:/alignpipe-policy@champion \
        --serve models:/alignpipe-policy-onnx@champion --max-new-tokens 48 --tokenizer .tmp/serve/policy

Each request is POST /invocations {"inputs": [one held-out prompt]}; prompts cycle through data/prompts.jsonl.
Prints requests/s, p50/p95/p99 latency, the error count (non-200 answers, bad bodies, timeouts), generated
tokens/s (answers re-tokenized with --tokenizer) and the 1-minute load average sampled during the run;
`--out FILE.md` also writes them as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
import urllib.error
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


def one_request(url: str, prompt: str, params: dict | None, timeout: float) -> tuple[float, str | None, str]:
    """(latency in s, error or None, the answer) of one POST /invocations."""
    body = {"inputs": [prompt]}
    if params:
        body["params"] = params
    req = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    text = ""
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            answer = json.loads(r.read())
        ok = isinstance(answer.get("predictions"), list) and len(answer["predictions"]) == 1 \
            and isinstance(answer["predictions"][0], str)
        error = None if ok else f"unexpected body {str(answer)[:80]}"
        text = answer["predictions"][0] if ok else ""
    except urllib.error.HTTPError as e:
        error = f"HTTP {e.code}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        error = type(e).__name__
    return time.perf_counter() - start, error, text


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


def run_load(url: str, prompts: list[str], n_requests: int = 1000, concurrency: int = 16,
             params: dict | None = None, timeout: float = 120.0) -> dict:
    """Send `n_requests` requests with `concurrency` client threads; returns throughput, latency, errors and the
    answers (`answers`, in request order)."""
    with LoadSampler() as load:
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(lambda i: one_request(url, prompts[i % len(prompts)], params, timeout),
                                    range(n_requests)))
        wall = time.perf_counter() - start
    latencies = sorted(lat for lat, _, _ in results)
    errors = [e for _, e, _ in results if e is not None]
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"requests": n_requests, "concurrency": concurrency, "seconds": wall,
            "requests_per_s": n_requests / wall, "p50_ms": 1000 * q[49], "p95_ms": 1000 * q[94],
            "p99_ms": 1000 * q[98], "mean_ms": 1000 * statistics.fmean(latencies), "errors": len(errors),
            "error_kinds": sorted(set(errors)), "answers": [a for _, _, a in results],
            "load_mean": statistics.fmean(load.samples), "load_max": max(load.samples)}


def add_tokens(stats: dict, tokenizer) -> None:
    """Generated tokens per answer and per second (answers re-tokenized: a server that strips whitespace
    returns fewer tokens than it generated)."""
    n = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in stats["answers"]) if tokenizer else 0
    stats["tokens_per_answer"] = n / max(len(stats["answers"]), 1) if tokenizer else None
    stats["tokens_per_s"] = n / stats["seconds"] if tokenizer else None


def markdown(rows: list[tuple[str, dict]], setup: dict) -> str:
    lines = ["# Serving load benchmark", "", "`python benchmarks/serve_load.py " + setup["argv"] + "`", ""]
    lines += [f"- {k}: {v}" for k, v in setup.items() if k != "argv"]
    lines += ["", "| server | requests | clients | wall s | requests/s | p50 ms | p95 ms | p99 ms | errors | "
              "tokens/answer | tokens/s | load avg mean / max |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, st in rows:
        tok = (f"{st['tokens_per_answer']:.1f} | {st['tokens_per_s']:.0f}" if st.get("tokens_per_s") is not None
               else "n/a | n/a")
        lines.append(f"| {name} | {st['requests']} | {st['concurrency']} | {st['seconds']:.1f} | "
                     f"{st['requests_per_s']:.1f} | {st['p50_ms']:.0f} | {st['p95_ms']:.0f} | {st['p99_ms']:.0f} | "
                     f"{st['errors']} | {tok} | {st['load_mean']:.1f} / {st['load_max']:.1f} |")
    lines.append("")
    for name, st in rows:
        if st["error_kinds"]:
            lines += [f"Errors of {name}: {', '.join(st['error_kinds'])}", ""]
    return "\n".join(lines)


def measure(url: str, proc, args, prompts: list[str], params: dict | None) -> tuple[dict, float]:
    """(stats, seconds until ready) of one server: wait for /ping, warm up, then the timed run."""
    ready_s = wait_ready(url, proc=proc)
    if args.warmup:
        run_load(url, prompts, args.warmup, min(args.concurrency, args.warmup), params)
    return run_load(url, prompts, args.requests, args.concurrency, params), ready_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", default="http://127.0.0.1:5001", help="server base URL")
    parser.add_argument("--serve", metavar="MODEL_URI", action="append", default=[],
                        help="start `mlflow models serve -m MODEL_URI` (local env) on a free port, measure it, then "
                        "stop it (uses MLFLOW_TRACKING_URI); repeat to compare servers in one run")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of the started server")
    parser.add_argument("--requests", type=int, default=1000, help="total requests (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--prompts", default="data/prompts.jsonl", help="JSONL with 'prompt' (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, help="request param max_new_tokens (default: the model's)")
    parser.add_argument("--tokenizer", help="tokenizer directory to count generated tokens (tokens/s)")
    parser.add_argument("--warmup", type=int, default=16, help="requests sent before timing (default: %(default)s)")
    parser.add_argument("--out", help="also write the results as Markdown to this file")
    args = parser.parse_args(argv)

    prompts = load_prompts(args.prompts)
    params = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else None
    tokenizer = None
    if args.tokenizer:
        from alignpipe.lm.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    rows, ready = [], {}
    for target in args.serve or [args.url.rstrip("/")]:
        proc, url = None, target
        if args.serve:
            log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve_load_{os.getpid()}_{len(rows)}.log"
            proc, url = start_server(target, args.workers, log_path)
            print(f"started mlflow models serve -m {target} at {url} (log: {log_path})", flush=True)
        try:
            stats, ready[target] = measure(url, proc, args, prompts, params)
        finally:
            if proc is not None:
                stop_server(proc)
        add_tokens(stats, tokenizer)
        rows.append((target, stats))
        print(f"{target}: {stats['requests']} requests, {stats['concurrency']} clients, {stats['seconds']:.1f} s: "
              f"{stats['requests_per_s']:.1f} requests/s, p50 {stats['p50_ms']:.0f} ms, p95 {stats['p95_ms']:.0f} "
              f"ms, p99 {stats['p99_ms']:.0f} ms, errors {stats['errors']}"
              + (f" ({', '.join(stats['error_kinds'])})" if stats["errors"] else "")
              + (f", {stats['tokens_per_s']:.0f} tokens/s" if stats["tokens_per_s"] is not None else "")
              + f", load average {stats['load_mean']:.1f} (max {stats['load_max']:.1f})", flush=True)
    if args.out:
        setup = {"argv": " ".join(argv if argv is not None else sys.argv[1:]),
                 "servers": "; ".join(f"mlflow models serve -m {t} --env-manager local --workers {args.workers} "
                                      f"(ready after {ready[t]:.1f} s)" for t in args.serve) or args.url,
                 "prompts": f"{args.prompts} ({len(prompts)} prompts, cycled), one prompt per request",
                 "max_new_tokens": args.max_new_tokens or "model default",
                 "machine": f"{platform.machine()}, {cpu_name()}, {os.cpu_count()} CPUs, "
                            f"Python {platform.python_version()}"}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(markdown(rows, setup), encoding="utf-8")
    return 0 if all(st["errors"] == 0 for _, st in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
