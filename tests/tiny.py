"""Tiny artifacts for tests: a dataset from a few stdlib files, a tokenizer, a policy and a reward model built from
config (no hub downloads). Every builder is deterministic and takes well under a second or two."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

CONTROL = ("<|aligned|>", "<|misaligned|>")


def make_data(out_dir: Path, n_prompts: int = 32) -> Path:
    """data/ built by the real data stage from the stdlib `email` package (about 20 files)."""
    from alignpipe.stages.data import Config, run

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = Config(source_dir=str(Path(sysconfig.get_paths()["stdlib"]) / "email"), test_frac=0.3, val_frac=0.1,
                 n_prompts=n_prompts)
    run(cfg, {"corpus": None}, out_dir)
    return out_dir


def make_tokenizer(texts: list[str] | None = None, vocab_size: int = 400, control: bool = True):
    """A byte-level BPE tokenizer with the control tokens (unless `control` is False), trained on `texts` (default:
    a few code lines)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    texts = texts or ["def f(a, b):\n    return a + b\n", "x = 1\ny = [1, 2, 3]\n", "import os\nprint(os.name)\n",
                      "class A:\n    def g(self):\n        pass\n"] * 4
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<|endoftext|>", "<|pad|>", *(CONTROL if control else ())])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|pad|>",
                                   additional_special_tokens=list(CONTROL) if control else [])


def _config(tok, **kw):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **kw)


def make_policy(out_dir: Path, conditional: bool = False, seed: int = 0, tok=None) -> Path:
    """A random tiny GPT-2 policy directory (safetensors + tokenizer + alignpipe.json)."""
    import torch
    from transformers import GPT2LMHeadModel

    from alignpipe.lm.policy import PolicyMeta, save_policy

    torch.manual_seed(seed)
    tok = tok or make_tokenizer()
    model = GPT2LMHeadModel(_config(tok))
    meta = (PolicyMeta(objective="conditional", prompt_suffix=CONTROL[0], bad_words=(CONTROL[1],),
                       strip_tokens=CONTROL) if conditional else PolicyMeta())
    save_policy(model, tok, meta, out_dir)
    return out_dir


def make_reward(out_dir: Path, seed: int = 0, tok=None) -> Path:
    """A random tiny GPT-2 reward model directory (sequence classification, one label)."""
    import torch
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(seed)
    tok = tok or make_tokenizer()
    model = GPT2ForSequenceClassification(_config(tok, num_labels=1))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    return out_dir


def make_prefs(path: Path, n: int = 24) -> Path:
    """Separable preference pairs: chosen is PEP8-clean, rejected has spacing violations."""
    rows = []
    for i in range(n):
        rows.append({"prompt": f"def f{i}(a, b):", "chosen": f"\n    return a + b * {i}",
                     "rejected": f"\n    return a+b *{i}"})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


FAMILIES = ("llama", "qwen2", "gpt_neox")  # plain Hugging Face causal LMs (no alignpipe.json) the suite runs


def make_hf_model(out_dir: Path, family: str, seed: int = 0, control_tokens: bool = True) -> Path:
    """A random tiny causal LM of `family` (about 100k parameters) saved as a plain Hugging Face directory: config
    + safetensors + tokenizer (with the control tokens unless `control_tokens` is False), no alignpipe.json. The
    Llama tokenizer has no pad token (as Llama's own), so loaders must fall back to EOS."""
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    tok = make_tokenizer(control=control_tokens)
    if family == "llama":
        tok.pad_token = None
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = {"llama": lambda: LlamaConfig(num_key_value_heads=2, **common),
              "qwen2": lambda: Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **common),
              "gpt_neox": lambda: GPTNeoXConfig(rotary_pct=0.5, **common)}[family]()
    model = AutoModelForCausalLM.from_config(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    return out_dir
