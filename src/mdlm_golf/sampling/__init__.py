"""Sampling from a trained model: the MDLM samplers, left to right for AR, block by block for block diffusion."""
from .generation import generate
from .options import MAX_SAMPLES, SAMPLERS, SampleOptions, SampleResult, decode_rows, live_widths
from .steps import run_network

__all__ = [
    "generate", "MAX_SAMPLES", "SAMPLERS", "SampleOptions", "SampleResult", "decode_rows", "live_widths",
    "run_network",
]
