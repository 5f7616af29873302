"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) through peft, shared by reward, dpo, orpo, ppo and grpo.

One block of config fields (`LoraFields`, mixed into those stages' configs): `lora_r: 0` trains every weight (the
default, the code path the default run takes); `lora_r > 0` freezes the base and trains rank-r adapters on
`lora_target_modules` (peft's "all-linear": every linear layer but the output head). Adapters are merged into the
base weights before a stage saves (`merged`), so every saved model is a plain Hugging Face directory that the next
stage, export and serving load as before; no stage ever reads an adapter folder. `lora_4bit` (QLoRA, Dettmers et
al. 2023) loads the frozen base in 4-bit NF4 and needs CUDA and bitsandbytes; elsewhere `check_4bit` stops the
stage with one line before any work.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignpipe.core.config import MAX_BATCH, MAX_WIDTH, field
from alignpipe.core.errors import ConfigError

ALL_LINEAR = "all-linear"  # peft: every nn.Linear / Conv1D except the output layer


@dataclass(frozen=True)
class LoraFields:
    """LoRA settings of a training stage (mixed into its Config; checked by `check_lora`)."""

    lora_r: int = field(0, "LoRA rank (peft); 0 = full fine-tuning. Adapters are merged into the weights on save",
                        ge=0, le=MAX_WIDTH)
    lora_alpha: int = field(32, "LoRA alpha (the update is scaled by alpha / r)", ge=1, le=MAX_BATCH)
    lora_dropout: float = field(0.05, "dropout on the LoRA input", ge=0, lt=1)
    lora_target_modules: list[str] = field([ALL_LINEAR], "module names LoRA adapts ('all-linear': every linear "
                                           "layer but the output head)", nonempty=True)
    lora_4bit: bool = field(False, "QLoRA: load the frozen base in 4-bit NF4 (needs CUDA and bitsandbytes)")

    def check_lora(self) -> None:
        self.check(not self.lora_4bit or self.lora_r > 0, "lora_4bit", "needs lora_r > 0 (adapters to train)")


def check_4bit(cfg) -> None:
    """Stop before any work when 4-bit (QLoRA) is asked for where it cannot run."""
    import importlib.util

    import torch

    if not cfg.lora_4bit:
        return
    missing = [what for what, ok in (("CUDA", torch.cuda.is_available()),
                                     ("bitsandbytes", importlib.util.find_spec("bitsandbytes") is not None)) if not ok]
    if missing:
        raise ConfigError(f"{cfg.section()}.lora_4bit", f"4-bit QLoRA needs {' and '.join(missing)}, which this "
                          "machine lacks: set lora_4bit false (LoRA in full precision) or run on a GPU node")


def quantization_config(cfg):
    """transformers' BitsAndBytesConfig for a 4-bit base (NF4, bf16 compute), or None."""
    if not cfg.lora_4bit:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def lora_config(cfg, model, task: str = "CAUSAL_LM"):
    """peft's LoraConfig from the stage config (None when lora_r is 0); `task` is a peft TaskType name."""
    if cfg.lora_r == 0:
        return None
    from peft import LoraConfig, TaskType

    targets = list(cfg.lora_target_modules)
    conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())  # GPT-2 stores weights transposed
    return LoraConfig(task_type=getattr(TaskType, task), r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, fan_in_fan_out=conv1d,
                      target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else targets)


def with_lora(cfg, model, task: str = "CAUSAL_LM"):
    """`model` wrapped with trainable adapters (peft), or `model` itself when lora_r is 0 (for stages that train
    without a TRL trainer, which would otherwise take the LoraConfig)."""
    config = lora_config(cfg, model, task)
    if config is None:
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.lora_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, config)


def merged(model):
    """The plain model with its LoRA adapters folded into the weights (W + B A * alpha / r); a model without
    adapters is returned as it is."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    model = model.merge_and_unload()
    return model.dequantize() if getattr(model, "is_quantized", False) else model  # QLoRA: save full precision


def trainable_fraction(model) -> float:
    """Trainable parameters / all parameters (1.0 for full fine-tuning)."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / max(total, 1)
