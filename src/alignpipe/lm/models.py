"""Model building for pretraining: a GPT-2 built from config, or a model to continue from; its training FLOPs;
the autocast precision the hardware supports. Tokenizers: `alignpipe.lm.tokenizers`.

No hub download happens unless a Hugging Face id is given (and HF_HUB_OFFLINE is unset).
"""

from __future__ import annotations

from pathlib import Path

from alignpipe.core.errors import DataError, loading


def bf16_supported() -> bool:
    """Whether bf16 autocast is fast here: a CUDA device with bf16, or a CPU with avx512_bf16 or AMX."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def device_and_dtype(precision: str):
    """(device, autocast dtype or None) for a `precision` of auto (bf16 where `bf16_supported`), bf16 or fp32."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "fp32":
        return device, None
    if precision == "bf16" or bf16_supported():
        return device, torch.bfloat16
    return device, None


def build_model(tok, n_embd: int, n_layer: int, n_head: int, n_positions: int, init_model: str = ""):
    """A GPT-2 LM: from scratch (no dropout: every run here sees each token at most about once), or
    `init_model` (any Hugging Face causal LM, id or path, safetensors, no custom code) with its embeddings resized
    to the tokenizer (which gained the control tokens) and the tokenizer's pad token recorded in its config."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if init_model:
        model = load_pretrained(AutoModelForCausalLM, init_model, "model (init_model)")
        if model.get_input_embeddings().num_embeddings < len(tok):
            model.resize_token_embeddings(len(tok))
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        return model
    config = GPT2Config(vocab_size=len(tok), n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        n_positions=n_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    return GPT2LMHeadModel(config)


# The weight prefixes of causal LMs' output heads as checkpoints name them (GPT-NeoX saves its head as embed_out):
# what a reward model built on a causal LM leaves unused.
LM_HEADS = ("lm_head.", "embed_out.")


def load_pretrained(auto_class, path: str | Path, what: str, tok=None, new_head: tuple[str, ...] = (),
                    unused_head: bool = False, **kwargs):
    """`auto_class.from_pretrained(path, **kwargs)` (safetensors only), the one place alignpipe loads weights, refused
    with one DataError line naming `path` unless they match the model: no missing, unexpected or mismatched keys
    (transformers' loading info; `new_head`: prefixes of the layers a new head may lack, e.g. a reward model's
    `score.`; `unused_head`: a causal LM's output head (`LM_HEADS`) may be left unused), every weight finite, and
    an embedding at least as large as the tokenizer `tok` when given."""
    import logging

    import torch
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity(logging.ERROR)  # the MISSING/UNEXPECTED table: refused below in one line
    try:
        with loading(path, what):
            model, info = auto_class.from_pretrained(str(path), use_safetensors=True, output_loading_info=True,
                                                     **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        bad = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(kind) or ()
                     if not (isinstance(k, str) and k.startswith(new_head) and new_head)
                     and not (kind == "unexpected_keys" and unused_head and k.startswith(LM_HEADS)))
        if bad:
            raise DataError(str(path), f"the {what} do not match the model: {len(bad)} {kind.replace('_', ' ')} "
                            f"(e.g. {bad[0]}): weights saved from another architecture or renamed")
    broken = next((name for name, p in model.named_parameters()
                   if p.dtype.is_floating_point and not torch.isfinite(p).all()), None)
    if broken is not None:
        raise DataError(str(path), f"the {what} hold NaN or infinite values (e.g. {broken})")
    if tok is not None and len(tok) > model.get_input_embeddings().num_embeddings:
        raise DataError(str(path), f"the tokenizer has {len(tok)} tokens but the model's embedding only "
                        f"{model.get_input_embeddings().num_embeddings} rows: they do not belong together")
    return model


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


def context_length(model) -> int | None:
    """The positions a model can attend to (GPT-2's n_positions, Llama-style max_position_embeddings)."""
    return getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
