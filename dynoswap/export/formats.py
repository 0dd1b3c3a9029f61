"""Export formats: a registry of writers and runners (ONNX through the dynamo exporter, torch.export .pt2).

Each format writes a module traced at one example input to a file, and runs a written
file on an input, so :mod:`dynoswap.export.exporter` can verify what it wrote against
the eager model.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ExportError

if TYPE_CHECKING:
    import torch
    from torch import nn

#: One line for a missing optional dependency.
EXTRA_HINT = "pip install 'dynoswap[export]'"
DEFAULT_OPSET = 18
#: The mark an exported file carries (ONNX metadata_props, a pt2 extra file): what ``--force`` may replace.
MARK_KEY = "dynoswap"
MARK_VALUE = "export"


@dataclass(frozen=True)
class Format:
    """One export format.

    Attributes:
        name: What users type (``onnx``, ``pt2``).
        suffix: The file suffix (``.onnx``).
        requires: Modules the format needs (from the ``export`` extra).
        write: ``write(model, example, path, dynamic_batch, opset)`` writes the traced model.
        run: ``run(path, inputs)`` loads a written file once and returns its outputs (a list of
            tensors) for each input.
        runner: What runs the file, for reports.
        detect: Whether an existing file is one this format wrote (what ``--force`` may replace).
    """

    name: str
    suffix: str
    requires: tuple[str, ...]
    write: Callable[[nn.Module, torch.Tensor, Path, bool, int], None]
    run: Callable[[Path, list[torch.Tensor]], list[list[torch.Tensor]]]
    runner: str
    detect: Callable[[Path], bool]

    @property
    def output_kind(self) -> str:
        """The output kind of its files (:mod:`dynoswap.io.output`): what ``force`` may replace."""
        return f"{self.name} export"

    def check_available(self) -> None:
        """Raise ExportError naming the pip install when a required module is missing (found, not imported)."""
        missing = []
        for module in self.requires:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                missing.append(module)
        if missing:
            raise ExportError(f"{self.name} export needs {', '.join(missing)}: {EXTRA_HINT}")


_FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add (or, with a warning, replace) an export format."""
    from ..io.output import register_output_kind

    if fmt.name in _FORMATS:
        warnings.warn(f"export format {fmt.name!r} is registered again; the new one replaces it", stacklevel=2)
    _FORMATS[fmt.name] = fmt
    register_output_kind(fmt.output_kind, fmt.detect)
    return fmt


def lookup_format(name: str) -> Format:
    """Return the registered format ``name``."""
    try:
        return _FORMATS[name]
    except KeyError as exc:
        raise ExportError(f"unknown export format {name!r}; known: {', '.join(sorted(_FORMATS))}") from exc


def format_names() -> list[str]:
    """Return the names of the registered formats."""
    return sorted(_FORMATS)


def format_of_path(path: str | Path) -> Format:
    """Return the format whose suffix ``path`` has."""
    suffix = Path(path).suffix.lower()
    for fmt in _FORMATS.values():
        if fmt.suffix == suffix:
            return fmt
    raise ExportError(f"cannot tell the export format of {path}: use one of {[f.suffix for f in _FORMATS.values()]}")


def leaves(output: Any) -> list[torch.Tensor]:
    """Return the tensors of a model output (tensor, tuple, dict...), in the order exporters flatten them."""
    import torch
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]


def _dynamic_shapes(dynamic_batch: bool) -> tuple[dict[int, Any]] | None:
    import torch

    return ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None


@contextlib.contextmanager
def _quiet() -> Any:
    """Keep exporters' progress prints and warnings off stdout (``--json`` prints one object)."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -- ONNX -----------------------------------------------------------------------------
def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool, opset: int) -> None:
    import torch

    with _quiet():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=_dynamic_shapes(dynamic_batch),
            input_names=["input"],
            verbose=False,
        )
        if program is None:
            raise ExportError("torch.onnx.export returned no program")
        program.model.metadata_props[MARK_KEY] = MARK_VALUE  # what proves the file is dynoswap's
        program.save(str(path))


def _run_onnx(path: Path, inputs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [[torch.from_numpy(o) for o in session.run(None, {name: x.detach().cpu().numpy()})] for x in inputs]


# -- torch.export ---------------------------------------------------------------------
def _write_pt2(model: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool, opset: int) -> None:
    import torch

    with _quiet():
        program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(dynamic_batch))
        # Through a file object: torch warns about any path (the work path) not ending in .pt2.
        with open(path, "wb") as fh:
            torch.export.save(program, fh, extra_files={MARK_KEY: MARK_VALUE})


def _run_pt2(path: Path, inputs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    import torch

    with _quiet(), open(path, "rb") as fh:
        module = torch.export.load(fh).module()
    with torch.no_grad():
        return [leaves(module(x)) for x in inputs]


def _varint(fh: Any) -> int | None:
    value = shift = 0
    while shift < 64:
        byte = fh.read(1)
        if not byte:
            return None
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
        shift += 7
    return None


def _onnx_metadata(fh: Any) -> dict[bytes, bytes]:
    """Read an ONNX ModelProto's metadata_props (field 14), skipping every other field unread."""
    found: dict[bytes, bytes] = {}
    for _ in range(64):  # a ModelProto has a dozen top-level fields
        tag = _varint(fh)
        if tag is None:
            break
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            if _varint(fh) is None:
                break
        elif wire == 2:
            length = _varint(fh)
            if length is None:
                break
            if field == 14 and length <= 4096:
                entry, fields = io.BytesIO(fh.read(length)), {}
                while (sub_tag := _varint(entry)) is not None and (size := _varint(entry)) is not None:
                    fields[sub_tag] = entry.read(size)  # StringStringEntryProto: key = 1, value = 2 (strings)
                key, value = fields.get(0x0A, b""), fields.get(0x12, b"")
                found[key] = value
            else:
                fh.seek(length, 1)
        else:
            break  # ModelProto has no other wire types at the top level
    return found


def _is_onnx_file(path: Path) -> bool:
    """Return whether ``path`` is an ONNX file dynoswap wrote: ``.onnx``, and dynoswap's mark in its metadata_props."""
    if path.is_symlink() or not path.is_file() or path.suffix.lower() != ".onnx":
        return False
    with open(path, "rb") as fh:
        return _onnx_metadata(fh).get(MARK_KEY.encode()) == MARK_VALUE.encode()


def _is_pt2_file(path: Path) -> bool:
    """Return whether ``path`` is a torch.export archive dynoswap wrote (``.pt2``, its mark in ``extra/``)."""
    import zipfile

    if path.is_symlink() or not path.is_file() or path.suffix.lower() != ".pt2" or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        marks = [i for i in archive.infolist() if i.filename.endswith(f"/extra/{MARK_KEY}") and i.file_size < 64]
        return any(archive.read(i) == MARK_VALUE.encode() for i in marks)


register_format(
    Format("onnx", ".onnx", ("onnx", "onnxscript", "onnxruntime"), _write_onnx, _run_onnx, "onnxruntime", _is_onnx_file)
)
register_format(Format("pt2", ".pt2", (), _write_pt2, _run_pt2, "torch.export.load", _is_pt2_file))
