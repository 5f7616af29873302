"""The export stage: the ONNX policy (a KV-cache decoder) and reward model, parity with PyTorch, int8 copies,
onnxruntime on the CPU provider, MLflow logging and registration. One tiny export is shared by the module."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import tiny

from alignpipe.lm import onnx_runtime as ox
from alignpipe.tracking import policies, registry, runs
from alignpipe.core.errors import ConfigError, DataError
from alignpipe.core.hashing import weights_sha256
from alignpipe.core.io import write_json
from alignpipe.run.runner import execute
from alignpipe.reports.candidates import BEST_FILE, best_candidate, write_best
from alignpipe.stages import export

PROMPTS = ["def f(a, b):", "x = [1, 2,", "import os", "class A:\n    def g(self):", "y = 1", "print(os.name)"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A conditional tiny policy, copied to best/ as evaluate's best candidate `dpo`, a reward model, prompts."""
    root = tmp_path_factory.mktemp("export")
    tok = tiny.make_tokenizer()
    policy = tiny.make_policy(root / "dpo", conditional=True, tok=tok)
    reward = tiny.make_reward(root / "reward", tok=tok)
    (root / "data").mkdir()
    (root / "data" / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (root / "evaluate").mkdir()
    best = write_best({"best_candidate": "dpo", "candidates": {
        "pretrain": {"path": str(root / "pretrain")},
        "dpo": {"path": str(policy), "weights_sha256": weights_sha256(policy)}}}, root / "evaluate")
    inputs = {"best": best, "reward_model": reward, "data": root / "data"}
    return {"root": root, "policy": policy, "best": best, "reward": reward, "inputs": inputs, "tok": tok}


@pytest.fixture(scope="module")
def exported(sources):
    """The stage run once through the runner (MLflow run included), with int8 copies."""
    db = f"sqlite:///{sources['root'] / 'mlflow.db'}"
    out = sources["root"] / "artifacts" / "export"
    cfg = export.Config(quantize=True, n_parity_prompts=4, max_new_tokens=12, latency_repeats=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", db)
        metrics = execute("export", cfg, sources["inputs"], out)
    return {"out": out, "metrics": metrics, "db": db}


def _cpu_sessions(out):
    return (ox.OrtPolicy(ox.open_session(out / "policy.onnx", [ox.CPU])),
            ox.OrtReward(ox.open_session(out / "reward.onnx", [ox.CPU])))


@pytest.mark.slow
def test_graphs_have_the_contracted_names_and_dynamic_axes(exported):
    policy, reward = _cpu_sessions(exported["out"])
    inputs = policy.session.get_inputs()
    n_layer = 2
    assert [i.name for i in inputs] == ["input_ids", "attention_mask", *ox.past_names(n_layer)]
    assert [o.name for o in policy.session.get_outputs()] == ["logits", *ox.present_names(n_layer)]
    assert all(isinstance(d, str) for d in inputs[0].shape + inputs[1].shape)  # batch and length are dynamic
    assert isinstance(inputs[2].shape[0], str) and isinstance(inputs[2].shape[2], str)  # batch, past length
    assert [i.name for i in reward.session.get_inputs()] == ["input_ids", "attention_mask"]
    (rewards,) = reward.session.get_outputs()
    assert rewards.name == "rewards" and len(rewards.shape) == 1 and isinstance(rewards.shape[0], str)


@pytest.mark.slow
def test_stage_reports_parity_within_tolerance_and_equal_greedy_generation(exported, sources):
    m = exported["metrics"]
    assert m["max_abs_diff_policy"] <= 1e-3 and m["max_abs_diff_reward"] <= 1e-3
    assert m["greedy_match_frac"] == 1.0 and m["n_parity_prompts"] == 4
    assert m["ort_speedup_reward"] > 0 and m["ort_speedup_generate"] > 0
    report = json.loads((exported["out"] / "report.json").read_text())
    assert report["candidate"] == "dpo" and report["policy_dir"] == str(sources["best"])
    assert report["prompt_template"] == "{prompt}<|aligned|>"  # the conditional policy's control suffix
    assert all(p["greedy_equal"] for p in report["parity"]["prompts"])
    assert json.loads((exported["out"] / "metrics.json").read_text()) == pytest.approx(m)


@pytest.mark.slow
def test_onnx_matches_pytorch_on_fresh_padded_batches(exported, sources):
    """Independent of the stage's own check: new prompts of different lengths (left padding), the cache path
    one token at a time, generation of a fixed length, and right-padded reward inputs."""
    from alignpipe.lm.policy import load_policy
    from alignpipe.lm.reward_model import load_reward_model

    model, tok, _ = load_policy(sources["policy"], device="cpu")
    reward_model, _ = load_reward_model(sources["reward"], device="cpu")
    policy, reward = _cpu_sessions(exported["out"])
    rows = [tok(t)["input_ids"] for t in ("return a + b", "x = 1\ny = [1, 2, 3]\nz", "import")]
    width = max(map(len, rows))
    ids = np.array([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])

    want = ox.torch_generate(model, ids, mask, 16, eos_token_id=None, pad_token_id=tok.pad_token_id)
    got = policy.generate(ids, mask, 16, pad_token_id=tok.pad_token_id)
    assert want.shape == (3, width + 16) and np.array_equal(got, want)
    full = np.concatenate([mask, np.ones((3, 16), int)], 1)
    diff = np.abs(policy.logits(want, full, prefill=width) - ox.torch_logits(model, want, full))
    assert diff[full.astype(bool)].max() < 1e-4

    r_ids = np.array([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    r_mask = mask[:, ::-1].copy()
    assert np.abs(reward.score(r_ids, r_mask) - ox.torch_rewards(reward_model, r_ids, r_mask)).max() < 1e-4


@pytest.mark.slow
def test_cpu_provider_session_opens_without_error_output(exported, capfd, caplog):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        providers = ox.choose_providers("auto")
        session = ox.open_session(exported["out"] / "reward.onnx", providers)
        rewards = ox.OrtReward(session).score(np.array([[5, 6, 7]]), np.array([[1, 1, 1]]))
    assert providers == [ox.CPU] and session.get_providers() == [ox.CPU]
    assert rewards.shape == (1,) and np.isfinite(rewards).all()
    assert capfd.readouterr().err == ""
    assert not caplog.records
    assert json.loads((exported["out"] / "report.json").read_text())["providers"] == [ox.CPU]


@pytest.mark.slow
def test_sampling_loop_is_seeded_and_top_1_is_greedy(exported):
    policy, _ = _cpu_sessions(exported["out"])
    ids, mask = np.array([[5, 6, 7], [0, 8, 9]]), np.array([[1, 1, 1], [0, 1, 1]])
    greedy = policy.generate(ids, mask, 8)
    assert np.array_equal(policy.generate(ids, mask, 8, do_sample=True, top_k=1), greedy)
    a = policy.generate(ids, mask, 8, do_sample=True, temperature=1.5, rng=np.random.default_rng(3))
    b = policy.generate(ids, mask, 8, do_sample=True, temperature=1.5, rng=np.random.default_rng(3))
    assert np.array_equal(a, b) and a.max() < policy.session.get_outputs()[0].shape[-1]


@pytest.mark.slow
def test_int8_copies_are_smaller_and_reported(exported):
    out, m = exported["out"], exported["metrics"]
    for name in ("policy", "reward"):
        assert (out / f"{name}.int8.onnx").stat().st_size < (out / f"{name}.onnx").stat().st_size
    report = json.loads((out / "quantized_report.json").read_text())
    assert report["n_reward_pairs"] == 6  # 4 held-out texts
    for key in ("reward_pair_accuracy", "greedy_match_frac"):
        assert 0.0 <= report["metrics"][key] <= 1.0 and m[f"int8_{key}"] == report["metrics"][key]
    assert 0 < m["int8_max_abs_diff_reward"] < 1.0 and m["int8_ort_speedup_generate"] > 0


@pytest.mark.slow
def test_models_are_logged_with_the_onnx_flavor_and_registered_with_links(exported, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", exported["db"])
    record = json.loads((exported["out"] / "onnx_models.json").read_text())
    assert record["candidate"] == "dpo" and record["run_id"]
    assert set(record["models"]) == {"policy", "reward", "policy_int8", "reward_int8"}
    logged = runs.mlflow_module().onnx.load_model(record["models"]["policy"]["model_uri"])
    assert [i.name for i in logged.graph.input][:2] == ["input_ids", "attention_mask"]

    client = registry.client()
    versions = policies.register_onnx(exported["out"], 3, "2", client)
    again = policies.register_onnx(exported["out"], 4, "2", client)
    policy_v = client.get_model_version(policies.POLICY_ONNX_NAME, versions[policies.POLICY_ONNX_NAME].version)
    reward_v = client.get_model_version(policies.REWARD_ONNX_NAME, versions[policies.REWARD_ONNX_NAME].version)
    assert policy_v.tags["alignpipe.pytorch_model"] == "alignpipe-policy"
    assert policy_v.tags["alignpipe.pytorch_version"] == "3" and policy_v.tags["alignpipe.candidate"] == "dpo"
    assert reward_v.tags["alignpipe.pytorch_version"] == "2" and reward_v.tags["alignpipe.precision"] == "fp32"
    assert policy_v.run_id == record["run_id"] and policy_v.source == record["models"]["policy"]["model_uri"]
    assert int(again[policies.POLICY_ONNX_NAME].version) == int(policy_v.version) + 1
    with pytest.raises(DataError, match="exported candidate is 'dpo', not 'ppo'"):
        policies.register_onnx(exported["out"], 5, "2", client, candidate="ppo")


@pytest.mark.slow
def test_failing_parity_fails_the_stage_and_writes_nothing(exported, sources, monkeypatch, tmp_path):
    # Reuse the exported graphs (the export itself is what the other tests cover); tolerance 0 cannot hold.
    monkeypatch.setattr(ox, "export_policy", lambda m, path, opset: shutil.copy(exported["out"] / "policy.onnx", path))
    monkeypatch.setattr(ox, "export_reward", lambda m, path, opset: shutil.copy(exported["out"] / "reward.onnx", path))
    out = tmp_path / "artifacts" / "export"
    cfg = export.Config(parity_atol=0.0, n_parity_prompts=2, max_new_tokens=4, latency_repeats=1)
    with pytest.raises(export.ParityError, match=r"policy logits differ from PyTorch by .* > parity_atol 0"):
        execute("export", cfg, sources["inputs"], out)
    assert not out.exists() and not list(out.parent.iterdir())


def test_greedy_divergence_is_named_in_the_error(sources):
    tok = sources["tok"]
    seqs = np.array([[5, 6, 7, 8], [5, 6, 7, 9]])
    logits = np.zeros((2, 4, len(tok)), np.float32)
    ref = export._Reference(ids=seqs[:, :2], mask=np.ones((2, 2), int), gen_kw={}, seqs=seqs,
                            full_mask=np.ones((2, 4), int), logits=logits, completions=[], r_ids=seqs,
                            r_mask=seqs, rewards=np.zeros(2), new_tokens=4)
    result = {"max_abs_diff_policy": 0.0, "max_abs_diff_reward": 0.0, "matches": [True, False],
              "seqs": np.array([[5, 6, 7, 8], [5, 6, 10, 9]])}
    expected = r"greedy generation differs on 1/2 prompts \(first: prompt 1, new token 0"
    with pytest.raises(export.ParityError, match=expected):
        export._check_parity(1e-3, result, ref, tok)


def test_best_names_evaluates_candidate_with_its_weights_checked(sources, tmp_path):
    name, report = best_candidate(sources["best"])
    assert name == "dpo" and report["order"] == ["dpo"] and set(report["candidates"]) == {"dpo"}
    assert best_candidate(sources["policy"]) == ("policy", None)  # a plain policy directory exports as itself
    tampered = shutil.copytree(sources["best"], tmp_path / "best")
    tiny.make_policy(tmp_path / "other", seed=7, tok=sources["tok"])
    shutil.copy(tmp_path / "other" / "model.safetensors", tampered / "model.safetensors")
    with pytest.raises(DataError, match="weights sha256 .* are not the ones evaluate measured for candidate 'dpo'"):
        best_candidate(tampered)
    write_json(tampered / BEST_FILE, {"best_candidate": "sft", "candidates": {}})
    with pytest.raises(DataError, match="best_candidate"):
        best_candidate(tampered)


def test_held_out_prompts_are_sampled_checked_or_fixed(sources, tmp_path):
    data = sources["inputs"]["data"]
    picked = export.held_out_prompts(data, 4, seed=0)
    assert len(picked) == 4 and set(picked) <= set(PROMPTS) and picked == export.held_out_prompts(data, 4, 0)
    assert export.held_out_prompts(tmp_path, 3, 0) == list(export.FALLBACK_PROMPTS[:3])
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "x = 1"}\n{"text": "y"}\n')
    with pytest.raises(DataError, match="row 2"):
        export.held_out_prompts(tmp_path, 3, 0)


@pytest.mark.parametrize("key,value", [("parity_atol", -1.0), ("opset", 17), ("n_parity_prompts", 0),
                                       ("providers", "tpu")])
def test_config_rejects_bad_values(key, value):
    with pytest.raises(ConfigError, match=f"export.{key}"):
        export.Config.from_dict({key: value})
