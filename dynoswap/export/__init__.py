"""Ship the learned shapes: freeze DynOPools into standard ops, write ONNX / torch.export files, verify them.

Public names load lazily (PEP 562), so that the format registry (``dynoswap.export.formats``)
can check a command's arguments without importing torch.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from ..lazy import lazy_names

#: public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "DEFAULT_ATOL": "exporter",
    "ExportResult": "exporter",
    "default_input_size": "exporter",
    "export_model": "exporter",
    "verify_export": "exporter",
    "Format": "formats",
    "format_names": "formats",
    "lookup_format": "formats",
    "register_format": "formats",
    "FROZEN_KEY": "freeze",
    "FrozenPool": "freeze",
    "FrozenSpec": "freeze",
    "describe": "freeze",
    "example_input": "freeze",
    "freeze": "freeze",
    "is_frozen": "freeze",
    "refreeze": "freeze",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .exporter import DEFAULT_ATOL, ExportResult, default_input_size, export_model, verify_export  # noqa: F401
    from .formats import Format, format_names, lookup_format, register_format  # noqa: F401
    from .freeze import (  # noqa: F401
        FROZEN_KEY,
        FrozenPool,
        FrozenSpec,
        describe,
        example_input,
        freeze,
        is_frozen,
        refreeze,
    )


__getattr__, __dir__ = lazy_names(__name__, _EXPORTS)


class _Package(types.ModuleType):
    """The package: ``freeze`` stays the function when the submodule of that name is imported.

    Importing ``dynoswap.export.freeze`` sets the package attribute ``freeze`` to the submodule;
    an eager ``from .freeze import freeze`` used to rebind it, a lazy package skips the binding
    (the submodule stays importable by its path) and ``__getattr__`` returns the function.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
