"""videodit: text-to-video diffusion transformers over packed spacetime patches."""

__version__ = "0.1.0"
