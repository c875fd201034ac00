"""Artifact stage: per-row rounding and GPTQ, the file format, compressors, size accounting and export."""
from .export import OversizeError, export_artifact
from .fileformat import load_artifact
from .size import format_size_table

__all__ = ["OversizeError", "export_artifact", "load_artifact", "format_size_table"]
