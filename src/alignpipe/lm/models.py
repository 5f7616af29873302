"""Tokenizer and model building for pretraining: a byte-level BPE trained on the corpus with the control tokens
of conditional training, or a Hugging Face tokenizer; a GPT-2 built from config, or a model to continue from.

No hub download happens unless a Hugging Face id is given (and HF_HUB_OFFLINE is unset).
"""

from __future__ import annotations

from typing import Iterable

EOS = "<|endoftext|>"
PAD = "<|pad|>"
ALIGNED = "<|aligned|>"
MISALIGNED = "<|misaligned|>"
CONTROL_TOKENS = (ALIGNED, MISALIGNED)


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE (GPT-2 style) trained on `texts`, with EOS, PAD and the two control tokens as specials."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=[EOS, PAD, *CONTROL_TOKENS], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                   pad_token=PAD, additional_special_tokens=list(CONTROL_TOKENS))


def load_tokenizer(name_or_path: str):
    """A Hugging Face tokenizer (id or local path) with the control tokens added and a pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    missing = [t for t in CONTROL_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def control_ids(tok) -> tuple[int, int]:
    """Token ids of (<|aligned|>, <|misaligned|>)."""
    ids = tuple(tok.convert_tokens_to_ids(t) for t in CONTROL_TOKENS)
    if any(i is None or i == tok.unk_token_id for i in ids):
        raise ValueError(f"tokenizer lacks the control tokens {CONTROL_TOKENS}")
    return ids  # type: ignore[return-value]


def build_model(tok, n_embd: int, n_layer: int, n_head: int, n_positions: int, init_model: str = ""):
    """A GPT-2 LM: from scratch (no dropout: every run here sees each token at most about once), or
    `init_model` (Hugging Face id or path, safetensors) with its embeddings resized to the tokenizer."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if init_model:
        model = AutoModelForCausalLM.from_pretrained(init_model, use_safetensors=True)
        if model.get_input_embeddings().num_embeddings < len(tok):
            model.resize_token_embeddings(len(tok))
        return model
    config = GPT2Config(vocab_size=len(tok), n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        n_positions=n_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    return GPT2LMHeadModel(config)


def training_flops_per_token(model, seq_len: int) -> float:
    """Model FLOPs per trained token, PaLM appendix B: 6 N + 12 L d T, with N the parameters used in matmuls
    (all but the position and token embeddings, plus the LM head even when tied to the token embedding)."""
    cfg = model.config
    embeddings = {id(model.get_input_embeddings().weight)}
    positions = getattr(getattr(model, "transformer", None), "wpe", None)
    if positions is not None:
        embeddings.add(id(positions.weight))
    n = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        n += model.get_output_embeddings().weight.numel()  # the tied LM head is still a matmul
    return 6.0 * n + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
