"""videodit: text-to-video diffusion transformers over packed spacetime patches.

The model classes are exported here so that diffusers' DiffusionPipeline.from_pretrained finds them by name.
"""

__version__ = "0.1.0"

from .dit import VideoDiT  # noqa: E402
from .pipeline import VideoDiTPipeline  # noqa: E402
from .vae import CausalVideoVAE  # noqa: E402

__all__ = ["CausalVideoVAE", "VideoDiT", "VideoDiTPipeline"]
