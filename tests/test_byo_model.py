"""Bring your own model: plain Hugging Face causal LMs of three families (Llama, Qwen2, GPT-NeoX; tiny, random,
built from config, no alignpipe.json) through reward (LoRA), dpo (full and LoRA), grpo (LoRA on GPT-NeoX), ppo
(LoRA), evaluate and export;
LoRA settings and QLoRA's error; pretrain continuing a plain Llama."""

from __future__ import annotations

import json
import math

import pytest
import tiny
import torch

from alignpipe.core.errors import ConfigError, DataError
from alignpipe.run.runner import execute
from alignpipe.stages import dpo, evaluate, export, grpo, ppo, reward


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _changed(a: dict, b: dict) -> int:
    return sum(not torch.equal(a[k], b[k]) for k in a if k in b)


@pytest.mark.slow
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_plain_hf_model_through_reward_dpo_grpo_evaluate_export(family, tmp_path, monkeypatch, tiny_data):
    """One plain HF directory as --policy (and reward's base): every stage runs on it, LoRA runs save plain merged
    models that differ from the base, and the exported KV-cache decoder matches PyTorch (parity, greedy)."""
    from alignpipe.lm.policy import PolicyMeta, load_policy

    monkeypatch.chdir(tmp_path)
    base = tiny.make_hf_model(tmp_path / "base", family)
    assert not (base / "alignpipe.json").exists()
    model, tok, meta = load_policy(base)
    assert meta == PolicyMeta() and tok.pad_token_id is not None
    assert (tok.pad_token_id == tok.eos_token_id) == (family == "llama")  # Llama's tokenizer has no pad token
    base_weights = _weights(base)
    prefs = tiny.make_prefs(tmp_path / "label" / "prefs.jsonl", n=24)

    rm = execute("reward", reward.Config(max_steps=2, batch_size=4, max_length=64, heldout_frac=0.25,
                                         checkpoint_dir=str(tmp_path / "ck_reward"), save_steps=0, lora_r=4),
                 {"prefs": prefs, "policy": base}, tmp_path / "reward")
    assert math.isfinite(rm["heldout_accuracy"]) and rm["n_changed_tensors"] > 0
    assert not list((tmp_path / "reward").glob("adapter_*"))

    common = dict(max_steps=2, batch_size=4, learning_rate=1e-3, warmup_steps=0, save_steps=2, logging_steps=1,
                  bf16=False, n_eval_prompts=4, sampling=dict(batch_size=4), max_prompt_tokens=64,
                  max_completion_tokens=16, eval_heldout=True)
    for name, extra in (("dpo", {}), ("dpo_lora", {"lora_r": 4, "lora_alpha": 8})):
        m = execute("dpo", dpo.Config(checkpoint_dir=str(tmp_path / f"ck_{name}"), **common, **extra),
                    {"data": tiny_data, "policy": base, "prefs": tmp_path / "label"}, tmp_path / name)
        assert math.isfinite(m["kl_to_ref"]) and m["n_prompt_boundary_mismatch"] == 0
        saved = _weights(tmp_path / name)
        assert set(saved) == set(base_weights) and _changed(base_weights, saved) > 0, name  # plain, merged
        assert not list((tmp_path / name).glob("adapter_*"))

    lora = {"lora_r": 4} if family == "gpt_neox" else {}  # GRPO with LoRA on one family (TRL's peft path)
    g = execute("grpo", grpo.Config(max_steps=1, prompts_per_step=4, num_generations=2,
                                    sampling=dict(max_new_tokens=8, max_prompt_tokens=64, batch_size=4),
                                    n_eval_prompts=4, learning_rate=1e-2, eval_heldout=True,
                                    checkpoint_dir=str(tmp_path / "ck_grpo"), **lora),
                {"data": tiny_data, "policy": base, "reward_model": None}, tmp_path / "grpo")
    grpo_weights = _weights(tmp_path / "grpo")
    assert g["train_steps"] == 1 and set(grpo_weights) == set(base_weights)
    assert _changed(base_weights, grpo_weights) > 0

    ev = execute("evaluate", evaluate.Config(n_prompts=4, sampling=dict(max_new_tokens=8, batch_size=4),
                                             ppl_max_chars=500),
                 {"data": tiny_data, "policy": base, "dpo": tmp_path / "dpo_lora", "grpo": tmp_path / "grpo",
                  "reward_model": tmp_path / "reward"}, tmp_path / "evaluate")
    report = json.loads((tmp_path / "evaluate" / "report.json").read_text())
    assert set(report["candidates"]) == {"pretrain", "dpo", "grpo"} and ev["n_candidates"] == 3

    ex = execute("export", export.Config(n_parity_prompts=3, max_new_tokens=8, latency_repeats=1),
                 {"best": tmp_path / "evaluate" / "best", "reward_model": tmp_path / "reward", "data": tiny_data},
                 tmp_path / "export")
    assert ex["max_abs_diff_policy"] <= 1e-3 and ex["max_abs_diff_reward"] <= 1e-3
    assert ex["greedy_match_frac"] == 1.0


@pytest.mark.slow
def test_ppo_with_lora_trains_adapters_only_and_saves_a_merged_model(tmp_path, monkeypatch, tiny_data):
    monkeypatch.chdir(tmp_path)
    base = tiny.make_hf_model(tmp_path / "base", "qwen2")
    cfg = ppo.Config(reward="oracle", max_steps=2, rollout_batch_size=4, minibatch_size=2, num_ppo_epochs=1,
                     sampling=dict(max_new_tokens=8, max_prompt_tokens=64, batch_size=4), learning_rate=1e-2,
                     bf16=False, n_eval_prompts=4, save_steps=1, checkpoint_dir=str(tmp_path / "ck"), lora_r=4,
                     eval_heldout=True)
    m = execute("ppo", cfg, {"data": tiny_data, "policy": base, "reward_model": None}, tmp_path / "ppo")
    assert math.isfinite(m["kl_to_ref"])
    before, after = _weights(base), _weights(tmp_path / "ppo")
    assert set(after) == set(before) and _changed(before, after) > 0
    # Embeddings and norms are not LoRA targets: they stay exactly as they were.
    assert all(torch.equal(before[k], after[k]) for k in before if "norm" in k or "embed" in k)
    assert (tmp_path / "ck" / "iter-000002" / "adapter_model.safetensors").is_file()
    resumed = execute("ppo", ppo.Config(**{**cfg.to_dict(), "max_steps": 3, "resume": True}),
                      {"data": tiny_data, "policy": base, "reward_model": None}, tmp_path / "ppo2")
    assert math.isfinite(resumed["kl_to_ref"])


def test_lora_settings_are_checked_and_4bit_without_cuda_is_one_clear_error(tmp_path):
    assert dpo.Config().lora_r == 0 and dpo.Config().lora_target_modules == ["all-linear"]  # off by default
    for cls in (reward.Config, dpo.Config, ppo.Config, grpo.Config):
        with pytest.raises(ValueError, match=f"{cls.SECTION}.lora_r must be >= 0"):
            cls(lora_r=-1)
        with pytest.raises(ValueError, match="lora_4bit needs lora_r > 0"):
            cls(lora_4bit=True)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the 4-bit error case does not apply")
    base = tiny.make_hf_model(tmp_path / "base", "llama")
    with pytest.raises(ConfigError, match="dpo.lora_4bit.*4-bit QLoRA needs CUDA"):
        dpo.run(dpo.Config(lora_r=4, lora_4bit=True), {"data": tmp_path, "policy": base, "prefs": tmp_path},
                tmp_path / "out")


def test_lora_targets_every_linear_layer_but_the_head():
    from alignpipe.algos.lora import lora_config, with_lora

    import transformers

    tok = tiny.make_tokenizer()
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    assert lora_config(dpo.Config(), model) is None
    wrapped = with_lora(dpo.Config(lora_r=2), model)
    adapted = {n.split(".lora_A")[0].split(".")[-1] for n, _ in wrapped.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(not p.requires_grad for n, p in wrapped.named_parameters() if "lora_" not in n)


def test_a_bad_policy_path_is_one_clear_error(tmp_path):
    from alignpipe.lm.policy import load_policy

    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "weights.bin").write_bytes(b"x")
    with pytest.raises(DataError, match="no config.json"):
        load_policy(tmp_path / "notamodel")
    base = tiny.make_hf_model(tmp_path / "base", "gpt_neox")
    (base / "model.safetensors").unlink()
    with pytest.raises(DataError, match="safetensors only"):
        load_policy(base)


def test_remote_code_stays_off_unless_asked(tmp_path):
    """A config that asks for custom code (auto_map) gets transformers' own class, or, for an architecture
    transformers lacks, one clear error: no file of the model directory is ever imported."""
    from alignpipe.lm.policy import load_policy

    base = tiny.make_hf_model(tmp_path / "base", "llama")
    (base / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (base / "config.json").write_text(json.dumps(config))
    model, _, _ = load_policy(base)
    assert type(model).__name__ == "LlamaForCausalLM"
    (base / "config.json").write_text(json.dumps({**config, "model_type": "evil"}))
    with pytest.raises(DataError, match="contains custom code"):
        load_policy(base)


@pytest.mark.slow
def test_pretrain_continues_a_plain_llama_with_control_tokens(tmp_path, tiny_data):
    """Conditional pretraining from a plain Llama directory: its tokenizer gains the control tokens, the
    embeddings grow to fit them, and the saved policy is prompted with <|aligned|>."""
    from alignpipe.lm.policy import load_policy
    from alignpipe.stages import pretrain

    base = tiny.make_hf_model(tmp_path / "base", "llama", control_tokens=False)
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    cfg = pretrain.Config(objective="conditional", init_model=str(base), seq_len=64, batch_size=4, max_steps=2,
                          n_eval_prompts=2, sampling=dict(max_new_tokens=8), eval_val_chars=1500, save_steps=2,
                          checkpoint_dir=str(tmp_path / "ck"))
    out = tmp_path / "out"
    out.mkdir()
    m = pretrain.run(cfg, {"data": tiny_data}, out)
    assert math.isfinite(m["heldout_loss"])
    model, tok, meta = load_policy(out)
    assert model.config.model_type == "llama" and meta.prompt_suffix == "<|aligned|>"
    assert all(t in tok.get_vocab() for t in ("<|aligned|>", "<|misaligned|>"))
    assert model.get_input_embeddings().num_embeddings == len(tok) == vocab + 2
    base_weights = _weights(base)
    assert _changed(base_weights, _weights(out)) > 0
