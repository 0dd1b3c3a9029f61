"""Ship the learned shapes: freeze DynOPools into standard ops, write ONNX / torch.export files, verify them."""

from .exporter import DEFAULT_ATOL, ExportResult, default_input_size, export_model, verify_export
from .formats import Format, format_names, lookup_format, register_format
from .freeze import FROZEN_KEY, FrozenPool, FrozenSpec, describe, example_input, freeze, is_frozen, refreeze

__all__ = [
    "DEFAULT_ATOL",
    "ExportResult",
    "FROZEN_KEY",
    "Format",
    "FrozenPool",
    "FrozenSpec",
    "default_input_size",
    "describe",
    "example_input",
    "export_model",
    "format_names",
    "freeze",
    "is_frozen",
    "lookup_format",
    "refreeze",
    "register_format",
    "verify_export",
]
