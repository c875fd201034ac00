"""mdlm-golf: masked diffusion language models for the parameter-golf challenge."""

__version__ = "0.1.0"
