"""Load test of a running MLflow model server: N requests from C concurrent clients (stdlib threads + urllib).

    python benchmarks/serve_load.py http://127.0.0.1:5001               # a server you started
    python benchmarks/serve_load.py --serve models:/alignpipe-policy@champion   # start one, measure, stop it

Each request is POST /invocations {"inputs": [one held-out prompt]}; prompts cycle through data/prompts.jsonl.
Prints requests/s, p50/p99 latency and the error count (non-200 answers, bad bodies, timeouts);
`--out FILE.md` also writes them as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from alignpipe.tracking.serving import start_server, stop_server, wait_ready

FALLBACK_PROMPTS = ["def add(a, b):", "for i in range(10):", "import os", "class Config:", "x = [1, 2,"]


def load_prompts(path: str | None) -> list[str]:
    """The `prompt` fields of a JSONL file (the fallback prompts when no file is given or found)."""
    if not path or not Path(path).is_file():
        return list(FALLBACK_PROMPTS)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def one_request(url: str, prompt: str, params: dict | None, timeout: float) -> tuple[float, str | None]:
    """(latency in s, error or None) of one POST /invocations."""
    body = {"inputs": [prompt]}
    if params:
        body["params"] = params
    req = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            answer = json.loads(r.read())
        ok = isinstance(answer.get("predictions"), list) and len(answer["predictions"]) == 1 \
            and isinstance(answer["predictions"][0], str)
        error = None if ok else f"unexpected body {str(answer)[:80]}"
    except urllib.error.HTTPError as e:
        error = f"HTTP {e.code}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        error = type(e).__name__
    return time.perf_counter() - start, error


def run_load(url: str, prompts: list[str], n_requests: int = 1000, concurrency: int = 16,
             params: dict | None = None, timeout: float = 120.0) -> dict:
    """Send `n_requests` requests with `concurrency` client threads; returns throughput, latency and errors."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda i: one_request(url, prompts[i % len(prompts)], params, timeout),
                                range(n_requests)))
    wall = time.perf_counter() - start
    latencies = sorted(lat for lat, _ in results)
    errors = [e for _, e in results if e is not None]
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"requests": n_requests, "concurrency": concurrency, "seconds": wall,
            "requests_per_s": n_requests / wall, "p50_ms": 1000 * q[49], "p99_ms": 1000 * q[98],
            "mean_ms": 1000 * statistics.fmean(latencies), "errors": len(errors),
            "error_kinds": sorted(set(errors))}


def markdown(stats: dict, setup: dict) -> str:
    lines = ["# Serving load benchmark", "", "`python benchmarks/serve_load.py " + setup["argv"] + "`", ""]
    lines += [f"- {k}: {v}" for k, v in setup.items() if k != "argv"]
    lines += ["", "| requests | clients | wall s | requests/s | p50 ms | p99 ms | mean ms | errors |",
              "|---|---|---|---|---|---|---|---|",
              f"| {stats['requests']} | {stats['concurrency']} | {stats['seconds']:.1f} | "
              f"{stats['requests_per_s']:.1f} | {stats['p50_ms']:.0f} | {stats['p99_ms']:.0f} | "
              f"{stats['mean_ms']:.0f} | {stats['errors']} |", ""]
    if stats["error_kinds"]:
        lines += [f"Errors: {', '.join(stats['error_kinds'])}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", default="http://127.0.0.1:5001", help="server base URL")
    parser.add_argument("--serve", metavar="MODEL_URI", help="start `mlflow models serve -m MODEL_URI` (local env)"
                        " on a free port, measure it, then stop it (uses MLFLOW_TRACKING_URI)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of the started server")
    parser.add_argument("--requests", type=int, default=1000, help="total requests (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--prompts", default="data/prompts.jsonl", help="JSONL with 'prompt' (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, help="request param max_new_tokens (default: the model's)")
    parser.add_argument("--warmup", type=int, default=16, help="requests sent before timing (default: %(default)s)")
    parser.add_argument("--out", help="also write the results as Markdown to this file")
    args = parser.parse_args(argv)

    proc = None
    url = args.url.rstrip("/")
    ready_s = None
    if args.serve:
        log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve_load_{os.getpid()}.log"
        proc, url = start_server(args.serve, args.workers, log_path)
        print(f"started mlflow models serve -m {args.serve} at {url} (log: {log_path})", flush=True)
    try:
        ready_s = wait_ready(url, proc=proc)
        prompts = load_prompts(args.prompts)
        params = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else None
        if args.warmup:
            run_load(url, prompts, args.warmup, min(args.concurrency, args.warmup), params)
        load_before = os.getloadavg()[0]
        stats = run_load(url, prompts, args.requests, args.concurrency, params)
        load_after = os.getloadavg()[0]
    finally:
        if proc is not None:
            stop_server(proc)
    print(f"{stats['requests']} requests, {stats['concurrency']} clients, {stats['seconds']:.1f} s: "
          f"{stats['requests_per_s']:.1f} requests/s, p50 {stats['p50_ms']:.0f} ms, p99 {stats['p99_ms']:.0f} ms, "
          f"errors {stats['errors']}" + (f" ({', '.join(stats['error_kinds'])})" if stats["errors"] else ""))
    if args.out:
        setup = {"argv": " ".join(argv if argv is not None else sys.argv[1:]),
                 "server": f"mlflow models serve -m {args.serve} --env-manager local --workers {args.workers}"
                 if args.serve else url,
                 "ready after (s)": f"{ready_s:.1f}" if ready_s is not None else "n/a",
                 "prompts": f"{args.prompts} ({len(prompts)} prompts, cycled)",
                 "max_new_tokens": args.max_new_tokens or "model default",
                 "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
                 "load average (1 min) before / after": f"{load_before:.1f} / {load_after:.1f} (a shared machine: "
                 "other jobs compete for the CPUs)"}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(markdown(stats, setup), encoding="utf-8")
    return 0 if stats["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
