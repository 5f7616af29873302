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


# A minimal ChatML template (the one Qwen2 and many instruct models use): what `task: chat` prompts the policy with.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_rows(n: int = 40) -> list[dict]:
    """Conversational preference pairs (TRL's form): chosen answers politely and on topic, rejected does not; every
    fourth prompt has a system turn and every fifth a second user turn."""
    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"What is {i} plus {i}?"}]
        if i % 4 == 0:
            prompt = [{"role": "system", "content": "You are a helpful assistant."}] + prompt
        if i % 5 == 0:
            prompt += [{"role": "assistant", "content": f"Do you mean {i} + {i}?"},
                       {"role": "user", "content": "Yes."}]
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}],
                     "rejected": [{"role": "assistant", "content": "no"}]})
    return rows


def make_chat_prefs(path: Path, n: int = 40) -> Path:
    """`chat_rows(n)` as JSONL, or as Parquet when `path` ends in .parquet (written by `datasets`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        from datasets import Dataset

        Dataset.from_list(chat_rows(n)).to_parquet(str(path))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(n)))
    return path


def make_chat_tokenizer():
    """The tiny BPE tokenizer plus ChatML's special tokens and chat template (EOS: <|im_end|>, ends a turn)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    texts = [m["content"] for r in chat_rows() for k in ("prompt", "chosen", "rejected") for m in r[k]] * 2
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts + ["user assistant system"], vocab_size=400, min_frequency=1,
                            special_tokens=["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|pad|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_chat_llama(out_dir: Path, seed: int = 0, end_logit: float = 0.0) -> Path:
    """A plain Hugging Face directory of a random tiny Llama (config + safetensors + tokenizer with a chat template,
    no alignpipe.json), a few hundred thousand parameters. A random model almost never samples <|im_end|>: with
    `end_logit` > 0 every position's <|im_end|> logit is raised by about that much (embedding dimension 0 carries a
    constant the final norm keeps positive; the LM head reads it only for <|im_end|>), so answers end their turn
    after a few tokens (end_logit 2: about 4 tokens on average at temperature 0.7, 1 in 6 answers empty)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = make_chat_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    if end_logit:
        with torch.no_grad():
            model.model.embed_tokens.weight[:, 0] = 4.0
            model.lm_head.weight[:, 0] = 0.0
            model.lm_head.weight[tok.convert_tokens_to_ids("<|im_end|>"), 0] = end_logit / cfg.hidden_size ** 0.5
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    return out_dir


def make_chat_model(out_dir: Path, family: str, seed: int = 0, end_logit: float = 2.0) -> Path:
    """`make_chat_llama`'s model in another family (`FAMILIES`: llama, qwen2, gpt_neox): a plain Hugging Face
    directory with the ChatML tokenizer, whose answers end their turn after a few tokens (`end_logit`, the same
    trick through the input and output embeddings)."""
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    tok = make_chat_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    config = {"llama": lambda: LlamaConfig(num_key_value_heads=1, **common),
              "qwen2": lambda: Qwen2Config(num_key_value_heads=1, **common),
              "gpt_neox": lambda: GPTNeoXConfig(rotary_pct=0.5, **common)}[family]()
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 4.0
        model.get_output_embeddings().weight[:, 0] = 0.0
        model.get_output_embeddings().weight[tok.convert_tokens_to_ids("<|im_end|>"), 0] = end_logit / 32 ** 0.5
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    return out_dir


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

if __name__ == "__main__":  # `python tests/tiny.py chat-llama DIR` / `chat-prefs FILE`: configs/chat-tiny.yaml's inputs
    import sys

    what, where = sys.argv[1], Path(sys.argv[2])
    builders = {"chat-llama": make_chat_llama, "chat-prefs": make_chat_prefs}
    if what not in builders:
        sys.exit(f"usage: python tests/tiny.py {{{','.join(builders)}}} PATH")
    print(builders[what](where))
