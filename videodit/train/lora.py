"""LoRA fine-tuning of the denoiser with peft: adapters on every block's attention and MLP projections.

    model = add_lora(VideoDiT.from_pretrained(base), rank=16)   # a peft PeftModel; only the adapters train
    model.save_pretrained("adapter")                             # the adapters alone (adapter_model.safetensors)
    model = load_lora(VideoDiT.from_pretrained(base), "adapter") # base + adapters
    plain = model.merge_and_unload()                             # a VideoDiT with the adapters merged in
"""

from peft import LoraConfig, PeftModel, get_peft_model

# self-attention qkv/proj, cross-attention q/kv/proj, MLP fc1/fc2 of every block (regex over module names)
TARGET_MODULES = r"blocks\.\d+\.(attn\.(qkv|proj)|cross_attn\.(q|kv|proj)|mlp\.(fc1|fc2))"


def add_lora(model, rank: int, alpha: float | None = None) -> PeftModel:
    """Wrap a VideoDiT with fresh LoRA adapters (B starts at zero: the output is unchanged); the base is frozen."""
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=TARGET_MODULES, lora_dropout=0.0)
    return get_peft_model(model, config)


def load_lora(model, adapter_dir: str, trainable: bool = False) -> PeftModel:
    """A VideoDiT with the adapters saved in `adapter_dir` (by PeftModel.save_pretrained)."""
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
