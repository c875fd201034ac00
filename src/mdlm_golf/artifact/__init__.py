"""Artifact stage: quantization, the file format, size accounting and export."""
from .export import OversizeError, export_artifact, format_size_table, load_artifact
