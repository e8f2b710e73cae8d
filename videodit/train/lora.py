"""LoRA fine-tuning of the denoiser with peft: adapters on every block's attention and MLP projections.

    model = add_lora(VideoDiT.from_pretrained(base), rank=16)   # a peft PeftModel; only the adapters train
    model.save_pretrained("adapter")                             # the adapters alone (adapter_model.safetensors)
    model = load_lora(VideoDiT.from_pretrained(base), "adapter") # base + adapters
    plain = model.merge_and_unload()                             # a VideoDiT with the adapters merged in
    plain = merge_lora(VideoDiT.from_pretrained(base), "adapter", scale=0.5)  # at half strength
"""

import os

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from ..data.video import readable

# self-attention qkv/proj, cross-attention q/kv/proj, MLP fc1/fc2 of every block (regex over module names)
TARGET_MODULES = r"blocks\.\d+\.(attn\.(qkv|proj)|cross_attn\.(q|kv|proj)|mlp\.(fc1|fc2))"


def add_lora(model, rank: int) -> PeftModel:
    """Wrap a VideoDiT with fresh LoRA adapters (B starts at zero: the output is unchanged; alpha = rank, so their
    scale is 1); the base is frozen."""
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGET_MODULES, lora_dropout=0.0)
    return get_peft_model(model, config)


def load_lora(model, adapter_dir: str) -> PeftModel:
    """A VideoDiT with the adapters saved in `adapter_dir` (by PeftModel.save_pretrained), frozen."""
    return PeftModel.from_pretrained(model, adapter_dir)


def save_adapters(model, folder: str, merge: bool = True):
    """A LoRA PeftModel's adapters written alone to <folder>/lora, and the model returned merged (a VideoDiT to save
    whole), or None without `merge`. Any other model is returned as it is."""
    if not isinstance(model, PeftModel):
        return model
    from .checkpoint import forget_origin

    forget_origin(model.get_base_model())  # its folder on this machine: not in the adapters' card and config
    for config in model.peft_config.values():
        config.base_model_name_or_path = None
    model.save_pretrained(os.path.join(folder, "lora"))
    readable(os.path.join(folder, "lora"))
    return model.merge_and_unload() if merge else None


def merge_lora(model, adapter_dir: str, scale: float = 1.0):
    """`model` (a VideoDiT) with the adapters of `adapter_dir` merged into its weights at `scale` times the strength
    they trained at (0 leaves the model as it was, negative steers away). Merge several by calling it again."""
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise ValueError(f"{adapter_dir}: not a LoRA adapter folder (it needs adapter_config.json, as a LoRA run "
                         f"writes to <output_dir>/lora)")
    try:
        adapted = load_lora(model, adapter_dir)
    except RuntimeError as e:  # a weight of another shape: the adapters belong to another model
        raise ValueError(f"{adapter_dir}: these adapters do not fit this denoiser, they were trained on a model of "
                         f"another size ({str(e).splitlines()[-1].strip()})") from None
    for module in adapted.modules():
        if isinstance(module, LoraLayer):
            module.scale_layer(scale)
    return adapted.merge_and_unload()
