"""Serving a chat policy: the ONNX completer's greedy answers to conversations equal a greedy PyTorch `generate()`
through the chat template (stopped at <|im_end|>), the logged `OnnxChatModel` answers a chat-completions request of
messages with one assistant message and refuses bad requests, and the register stage registers it for the chat task
as `alignpipe-policy-onnx@champion`, which `mlflow models serve` answers (bad requests: 4xx)."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading

import numpy as np
import pytest

import tiny
from alignpipe.run.runner import execute
from alignpipe.lm import onnx_runtime as ox
from alignpipe.lm.ort_sampling import Decoding, OrtCompleter
from alignpipe.lm.policy import PolicyMeta, load_policy
from alignpipe.reports.candidates import write_best
from alignpipe.tasks import get_task

CONVERSATIONS = [r["prompt"] for r in tiny.chat_rows(6)]  # plain, with a system turn, with a second user turn
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def chat_policy(tmp_path_factory):
    """A tiny chat Llama that ends some greedy turns with <|im_end|> within the budget, and its ONNX export."""
    root = tmp_path_factory.mktemp("chat_serving")
    llama = tiny.make_chat_llama(root / "llama")
    model, tok, _ = load_policy(llama, device="cpu")
    _end_turns_early(model, tok)
    model.save_pretrained(str(llama), safe_serialization=True)
    ox.export_policy(model, root / "policy.onnx")
    return {"llama": llama, "model": model, "tok": tok, "onnx": root / "policy.onnx"}


def _end_turns_early(model, tok) -> None:
    """A random model hardly ever ends its turn: give <|im_end|> 1.05 times the output row of the token the first
    conversation's greedy answer has fourth, so that the turn ends where that token would be chosen."""
    import torch

    token = _torch_rows(model, tok, CONVERSATIONS[:1], 192, 4)[0][3]
    with torch.no_grad():
        model.lm_head.weight[tok.convert_tokens_to_ids("<|im_end|>")] = 1.05 * model.lm_head.weight[token]


def _torch_rows(model, tok, conversations, max_prompt_tokens: int, max_new_tokens: int) -> list[list[int]]:
    """The reference: greedy `generate()` on the chat-templated, left-padded conversations (the last
    `max_prompt_tokens` tokens), stopping at EOS or <|im_end|>; each row's new ids up to and with its stop."""
    import torch

    stops = get_task("chat").stop_token_ids(tok)
    ids = [tok(tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"][-max_prompt_tokens:] for c in conversations]
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids])
    attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=tok.pad_token_id)
    rows = out[:, width:].tolist()
    return [row[:next((i + 1 for i, t in enumerate(row) if t in stops), len(row))] for row in rows]


def _answers(tok, rows: list[list[int]]) -> list[str]:
    return [tok.decode(r, skip_special_tokens=True).strip() for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("max_prompt_tokens", [192, 12])
def test_onnx_greedy_chat_answers_equal_torch_generate(chat_policy, max_prompt_tokens):
    model, tok = chat_policy["model"], chat_policy["tok"]
    completer = OrtCompleter(ox.OrtPolicy(ox.open_session(chat_policy["onnx"], [ox.CPU])), tok, PolicyMeta(),
                             max_prompt_tokens, get_task("chat"))
    greedy, rng = Decoding(MAX_NEW_TOKENS, do_sample=False), np.random.default_rng(0)
    expected = _torch_rows(model, tok, CONVERSATIONS, max_prompt_tokens, MAX_NEW_TOKENS)
    assert completer.generate(CONVERSATIONS, greedy, rng) == expected
    ended = [r[-1] == tok.convert_tokens_to_ids("<|im_end|>") for r in expected]
    assert any(ended) and not all(ended)  # turns that end at <|im_end|> and turns cut by the cap, in one batch
    got = completer.complete(CONVERSATIONS, greedy, rng)
    assert got == _answers(tok, expected) and all("<|" not in a for a in got)
    assert [completer.complete([c], greedy, rng)[0] for c in CONVERSATIONS] == got  # a batch answers as singles do
    sampled = completer.complete(CONVERSATIONS, Decoding(MAX_NEW_TOKENS), np.random.default_rng(1))
    assert len(sampled) == len(CONVERSATIONS) and all("<|" not in a for a in sampled)


@pytest.mark.slow
def test_logged_chat_model_answers_messages_and_refuses_bad_ones(chat_policy):
    import mlflow
    from mlflow.exceptions import MlflowException

    from alignpipe.serving.models import log_policy_model

    with mlflow.start_run():
        info = log_policy_model(chat_policy["onnx"], chat_policy["llama"],
                                {"max_new_tokens": MAX_NEW_TOKENS, "max_batch_size": 4}, task="chat")
    served = mlflow.pyfunc.load_model(info.model_uri)
    rows = _torch_rows(chat_policy["model"], chat_policy["tok"], CONVERSATIONS, 192, MAX_NEW_TOKENS)
    expected = _answers(chat_policy["tok"], rows)
    end = chat_policy["tok"].convert_tokens_to_ids("<|im_end|>")

    answers = {}

    def client(i):  # concurrent requests, batched by the model: each gets its own conversation's answer
        answers[i] = served.predict({"messages": CONVERSATIONS[i], "temperature": 0.0})["choices"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(CONVERSATIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, row in enumerate(rows):
        assert answers[i] == [{"index": 0, "message": {"role": "assistant", "content": expected[i]},
                               "finish_reason": "stop" if row[-1] == end else "length"}]
    short = served.predict({"messages": CONVERSATIONS[2], "temperature": 0.0, "max_tokens": 2})["choices"][0]
    assert short["finish_reason"] == "length" and short["message"]["content"] == _answers(chat_policy["tok"],
                                                                                         [rows[2][:2]])[0]

    user = [{"role": "user", "content": "Hi?"}]
    for bad, why in (({"messages": [{"role": "robot", "content": "Hi?"}]}, "non-empty list of"),
                     ({"messages": []}, "non-empty list of"),
                     ({"messages": user + [{"role": "assistant", "content": "Hello."}]}, "end on a user turn"),
                     ({"messages": user, "max_tokens": 10_000}, r"max_tokens must be an integer in \[1, 12\]"),
                     ({"messages": user, "temperature": -1.0}, "temperature must be >= 0"),
                     ({"messages": user, "top_p": 0.0}, r"top_p must be in \(0, 1\]"),
                     ({"messages": user, "stop": ["\n"]}, r"unsupported chat params \['stop'\]")):
        with pytest.raises(MlflowException, match=why):
            served.predict(bad)


@pytest.mark.slow
def test_register_serves_the_chat_model_as_champion(chat_policy, tmp_path):
    """register picks the chat serving model for evaluate's task chat; `mlflow models serve` answers a messages
    request with the greedy PyTorch answer, and bad requests with 4xx."""
    from alignpipe.core.hashing import weights_sha256
    from alignpipe.lm.reward_model import load_reward_model
    from alignpipe.stages import register
    from alignpipe.tracking import runs
    from alignpipe.serving.server import post_json, served

    reward_dir = tiny.make_reward(tmp_path / "reward", tok=tiny.make_chat_tokenizer())
    export = tmp_path / "export"
    export.mkdir()
    shutil.copy(chat_policy["onnx"], export / "policy.onnx")
    ox.export_reward(load_reward_model(reward_dir, device="cpu")[0], export / "reward.onnx")
    _log_export(export)
    ev = tmp_path / "ev"
    ev.mkdir()
    llama = chat_policy["llama"]
    best = write_best({
        "best_candidate": "dpo", "task": "chat", "gate_metric": "judge_win_rate_vs_ref", "gate_direction": "higher",
        "candidates": {"dpo": {"path": str(llama), "judge_win_rate_vs_ref": 0.6,
                               "weights_sha256": weights_sha256(llama)}}}, ev)
    execute("register", register.Config(max_new_tokens=8, serve_max_batch_size=4),
            {"best": best, "reward_model": reward_dir, "export": export}, tmp_path / "reg")
    uri = "models:/alignpipe-policy-onnx@champion"
    assert runs.mlflow_module().models.get_model_info(uri).flavors["python_function"]["loader_module"] == \
        "mlflow.pyfunc.loaders.chat_model"
    model, tok = chat_policy["model"], chat_policy["tok"]
    expected = _answers(tok, _torch_rows(model, tok, CONVERSATIONS, 192, 8))

    with served(uri, tmp_path / "serve.log", timeout=120) as url:
        for conversation, answer in zip(CONVERSATIONS[:2], expected):
            status, body = post_json(f"{url}/invocations", json.dumps(
                {"messages": conversation, "max_tokens": 8, "temperature": 0}).encode())
            assert status == 200 and body["choices"][0]["message"] == {"role": "assistant", "content": answer}, body
        user = [{"role": "user", "content": "Hi?"}]
        for bad in (b"not json", {"messages": [{"role": "robot", "content": "Hi?"}]}, {"messages": []},
                    {"messages": user + [{"role": "assistant", "content": "Hello."}]},
                    {"messages": user, "max_tokens": 10_000}, {"messages": user, "max_tokens": "many"}):
            status, body = post_json(f"{url}/invocations", bad if isinstance(bad, bytes) else json.dumps(bad).encode())
            assert 400 <= status < 500, (bad, status, body)


def _log_export(export) -> None:
    """What the export stage records after logging its graphs: onnx_models.json with the run and model URIs."""
    import onnx

    from alignpipe.tracking import runs

    mlflow = runs.mlflow_module()
    with mlflow.start_run() as run:
        entries = {}
        for key in ("policy", "reward"):
            info = mlflow.onnx.log_model(onnx.load(str(export / f"{key}.onnx")), name=key)
            entries[key] = {"model_uri": info.model_uri, "model_id": info.model_id, 
                            "sha256": hashlib.sha256((export / f"{key}.onnx").read_bytes()).hexdigest()}
    (export / "onnx_models.json").write_text(json.dumps({
        "run_id": run.info.run_id, "candidate": "dpo", "models": entries,
        "parity": {"greedy_match_frac": 1.0, "max_abs_diff_policy": 0.0, "max_abs_diff_reward": 0.0}}))
