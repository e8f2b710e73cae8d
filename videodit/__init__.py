"""videodit: text-to-video diffusion transformers over packed spacetime patches.

The model classes are exported here (imported on first use) so that diffusers' DiffusionPipeline.from_pretrained
finds them by name, and `python -m videodit.data.shapes` and the like start without loading the models.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {"CausalVideoVAE": "vae", "VideoDiT": "dit", "VideoDiTPipeline": "pipeline"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'videodit' has no attribute {name!r}")
