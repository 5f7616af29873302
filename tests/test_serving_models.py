"""The ONNX serving models: greedy answers equal `alignpipe.lm.policy.sample(..., greedy=True)` (whitespace kept,
one logical line), concurrent requests are batched, rewards equal PyTorch's, the register stage registers them
as `alignpipe-policy-onnx@champion`, and `mlflow models serve` answers them (malformed requests: 4xx)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from alignpipe.core.hashing import weights_sha256

import tiny
from alignpipe.run.runner import execute
from alignpipe.reports.candidates import write_best
from alignpipe.lm import onnx_runtime as ox
from alignpipe.lm.ort_sampling import Decoding, OrtCompleter
from alignpipe.lm.policy import Sampling, load_policy, sample
from alignpipe.stages import register
from alignpipe.serving.models import RequestBatcher
from alignpipe.serving.server import post_json, start_server, stop_server, wait_ready
from alignpipe.tasks import get_task

PROMPTS = ["def add(a, b):", "for i in range(3):", "x = [1, 2,", "class A:\n    def g(self):", "import os",
           "if x:\n    y = 1", "while True:", "    return None"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    tok = tiny.make_tokenizer()
    policy_dir = tiny.make_policy(root / "dpo", conditional=True, seed=5, tok=tok)
    reward_dir = tiny.make_reward(root / "reward", seed=1, tok=tok)
    model, tok, meta = load_policy(policy_dir, device="cpu")
    export = root / "export"
    export.mkdir()
    ox.export_policy(model, export / "policy.onnx")
    from alignpipe.lm.reward_model import load_reward_model

    reward, _ = load_reward_model(reward_dir, device="cpu")
    ox.export_reward(reward, export / "reward.onnx")
    return {"root": root, "policy": policy_dir, "reward": reward_dir, "export": export, "model": model, "tok": tok,
            "meta": meta, "reward_model": reward}


def _expected(models, prompts, max_new_tokens):
    return [s.completion for s in sample(models["model"], models["tok"], models["meta"], prompts,
                                         Sampling(max_new_tokens=max_new_tokens), greedy=True,
                                         unit=get_task("pep8").completion_unit())]


@pytest.mark.slow
@pytest.mark.parametrize("max_new_tokens", [6, 24])
def test_onnx_greedy_completions_equal_policy_sample(models, max_new_tokens):
    completer = OrtCompleter(ox.OrtPolicy(ox.open_session(models["export"] / "policy.onnx", [ox.CPU])),
                             models["tok"], models["meta"], Sampling().max_prompt_tokens, get_task("pep8"))
    got = completer.complete(PROMPTS, Decoding(max_new_tokens, do_sample=False), np.random.default_rng(0))
    assert got == _expected(models, PROMPTS, max_new_tokens)
    assert all(c.startswith("\n") for c in got)  # the unit starts with the newline: whitespace kept
    one_by_one = [completer.complete([p], Decoding(max_new_tokens, do_sample=False), np.random.default_rng(0))[0]
                  for p in PROMPTS]
    assert one_by_one == got  # a batch answers as single requests do
    sampled = completer.complete(PROMPTS, Decoding(max_new_tokens), np.random.default_rng(1))
    assert len(sampled) == len(PROMPTS) and all(s.startswith("\n") and "<|" not in s for s in sampled)


def test_batcher_merges_concurrent_requests_and_keeps_their_order():
    calls = []

    def run(key, items):
        calls.append((key, list(items)))
        if "boom" in items:
            raise ValueError("boom")
        time.sleep(0.01)
        return [f"{key}:{x}" for x in items]

    batcher = RequestBatcher(run, max_batch_size=4, window_s=0.05)
    results = {}

    def client(i):
        results[i] = batcher.submit("k" if i < 6 else "g", [f"p{i}"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: [f"{'k' if i < 6 else 'g'}:p{i}"] for i in range(8)}
    assert max(len(items) for _, items in calls) == 4 and len(calls) < 8  # merged, never over the cap
    assert all(len({x[1] for x in items}) >= 1 for _, items in calls)
    assert {key for key, _ in calls} == {"k", "g"}  # different settings never share a batch
    with pytest.raises(ValueError, match="boom"):
        batcher.submit("k", ["boom"])
    assert batcher.submit("k", ["after"]) == ["k:after"]  # the batcher survives a failed batch


def _register(models, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    ev = tmp_path / "ev"
    ev.mkdir()
    best = write_best({"best_candidate": "dpo", "candidates": {"dpo": {
        "path": str(models["policy"]), "violations_per_char": 0.01,
        "weights_sha256": weights_sha256(models["policy"])}}}, ev)
    (models["export"] / "onnx_models.json").write_text(json.dumps({
        "run_id": "", "candidate": "dpo", "models": {}, "parity": {}}))
    return best


@pytest.mark.slow
def test_register_serves_the_onnx_pyfunc_as_champion(models, tmp_path, monkeypatch):
    import onnx

    from alignpipe.tracking import registry, runs

    ev = _register(models, tmp_path, monkeypatch)
    with runs.mlflow_module().start_run() as run:  # what the export stage records after logging its graphs
        mlflow = runs.mlflow_module()
        entries = {}
        for key in ("policy", "reward"):
            info = mlflow.onnx.log_model(onnx.load(str(models["export"] / f"{key}.onnx")), name=key)
            entries[key] = {"model_uri": info.model_uri, "model_id": info.model_id, 
                            "sha256": hashlib.sha256((models["export"] / f"{key}.onnx").read_bytes()).hexdigest()}
        (models["export"] / "onnx_models.json").write_text(json.dumps({
            "run_id": run.info.run_id, "candidate": "dpo", "models": entries,
            "parity": {"greedy_match_frac": 1.0, "max_abs_diff_policy": 0.0, "max_abs_diff_reward": 0.0}}))
    execute("register", register.Config(max_new_tokens=8, serve_max_batch_size=4),
            {"best": ev, "reward_model": models["reward"], "export": models["export"]},
            tmp_path / "reg")
    champion = registry.model_version_by_alias("alignpipe-policy-onnx", "champion")
    assert champion is not None and champion["tags"]["alignpipe.pytorch_version"] == "1"
    assert registry.model_version_by_alias("alignpipe-reward-onnx", "champion") is not None

    served = runs.mlflow_module().pyfunc.load_model("models:/alignpipe-policy-onnx@champion")
    got = served.predict(PROMPTS, params={"do_sample": False})
    assert got == _expected(models, PROMPTS, 8)

    answers = {}

    def client(i):  # concurrent single-prompt requests: batched, each gets its own answer
        answers[i] = served.predict([PROMPTS[i]], params={"do_sample": False})[0]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [answers[i] for i in range(len(PROMPTS))] == got

    from alignpipe.lm.reward_model import reward_scores

    scorer = runs.mlflow_module().pyfunc.load_model("models:/alignpipe-reward-onnx@champion")
    pairs = [{"prompt": p, "completion": c} for p, c in zip(PROMPTS, got)]
    expected = reward_scores(models["reward_model"], models["tok"], PROMPTS, got)
    assert np.allclose(scorer.predict(pairs), expected, atol=1e-4)

    _serve_and_check(tmp_path, got)


def _serve_and_check(tmp_path: Path, expected: list[str]) -> None:
    log = tmp_path / "serve.log"
    proc, url = start_server("models:/alignpipe-policy-onnx@champion", 1, log)
    try:
        try:
            wait_ready(url, timeout=120, proc=proc)
        except (RuntimeError, TimeoutError) as e:
            pytest.fail(f"{e}: {log.read_text()[-3000:]}")
        status, body = post_json(f"{url}/invocations",
                             json.dumps({"inputs": PROMPTS, "params": {"do_sample": False}}).encode())
        assert status == 200 and body["predictions"] == expected, body
        assert body["predictions"][0].startswith("\n")  # not stripped
        for bad in (b"not json", json.dumps({"prompts": PROMPTS}).encode(), json.dumps({"inputs": []}).encode(),
                    json.dumps({"inputs": [""]}).encode(),
                    json.dumps({"inputs": PROMPTS, "params": {"max_new_tokens": "many"}}).encode(),
                    json.dumps({"inputs": PROMPTS, "params": {"max_new_tokens": 10_000}}).encode(),
                    json.dumps({"inputs": PROMPTS, "params": {"temperature": -1.0}}).encode()):
            status, body = post_json(f"{url}/invocations", bad)
            assert 400 <= status < 500, (bad, status, body)
    finally:
        stop_server(proc)


def test_pyfunc_request_params_are_bounded():
    """The pyfunc models' request params (`mlflow models serve`): NaN, infinite and huge temperatures, a NaN top-p,
    a boolean token cap, a non-boolean do_sample and unknown params (`stream`) are each refused with the field."""
    from mlflow.exceptions import MlflowException

    from alignpipe.serving.models import POLICY_DEFAULTS, decoding

    for params, why in (({"temperature": float("nan")}, "params.temperature"),
                        ({"temperature": float("inf")}, "params.temperature"),
                        ({"temperature": 1e308}, "params.temperature"), ({"top_p": float("nan")}, "params.top_p"),
                        ({"max_new_tokens": True}, "params.max_new_tokens"), ({"do_sample": "yes"}, "do_sample"),
                        ({"stream": True}, r"unknown params \['stream'\]")):
        with pytest.raises(MlflowException, match=why):
            decoding(POLICY_DEFAULTS, params)
    assert decoding(POLICY_DEFAULTS, {"temperature": 2, "top_p": 1}).temperature == 2.0
