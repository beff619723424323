"""rnnengine: fast, faithful CPU inference for LSTM, GRU and RNN models from ONNX.

The compiled core (rnnengine._core) is loaded on first use, so the pure-Python parts
(rnnengine.format.weightfile, the weight-file reader) import without it.
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Any

from rnnengine._version import __version__
from rnnengine.limits import Limits

from rnnengine.errors import (ConversionError, EngineError, FormatError, GraphRunError, LimitError,
                              NotStreamableError, OnnxRuntimeError, OpsetError, ProgramError, RnnEngineError,
                              SessionClosedError, StateError, UnsupportedError)

__all__ = ["Model", "Stream", "State", "convert", "load", "save", "from_torch", "step_streams", "Batcher", "Session",
           "state_to_bytes", "state_from_bytes", "LSTM", "GRU", "RNN",
           "ACTIVATIONS", "Limits", "load_onnx", "__version__",
           "RnnEngineError", "UnsupportedError", "ConversionError", "NotStreamableError", "LimitError", "OpsetError",
           "FormatError", "GraphRunError", "ProgramError", "StateError", "SessionClosedError", "EngineError",
           "OnnxRuntimeError"]

if TYPE_CHECKING:
    from rnnengine.runtime.base import Model

# public name -> the module that defines it; imported on first access (PEP 562), so that
# `import rnnengine` and the pure-Python parts (rnnengine.format, rnnengine.errors) work
# without the compiled core
_LAZY = {"Model": ".runtime.model", "Stream": ".runtime.model", "State": ".runtime.base",
         "step_streams": ".runtime.base",
         "LSTM": ".runtime.layers", "GRU": ".runtime.layers", "RNN": ".runtime.layers",
         "ACTIVATIONS": ".runtime.layers", "from_torch": ".frontend.torch_import",
         "Batcher": ".runtime.batcher", "Session": ".runtime.batcher",
         "state_to_bytes": ".runtime.portable", "state_from_bytes": ".runtime.portable"}


def _core_missing(err: ImportError) -> ImportError:
    """An ImportError that says why the compiled core is missing and what to do."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    hint = ("rnnengine's compiled core (rnnengine._core) is not built here: " + str(err) + ". ")
    if os.path.exists(os.path.join(root, "setup.py")):
        hint += (f"Python imported rnnengine from its source tree ({here}), which has no built "
                 "extension. Install it (pip install . or pip install -e .) and run from another "
                 "directory, or build in place with `pip install -e .`; `pytest` from the "
                 "repository root uses the installed package.")
    else:
        hint += "Reinstall the package: pip install --force-reinstall rnnengine."
    return ImportError(hint)


def _load_core() -> ModuleType:
    try:
        from rnnengine import _core
    except ImportError as err:
        if getattr(err, "name", None) in ("rnnengine._core", None) or "_core" in str(err):
            raise _core_missing(err) from err
        raise
    return _core


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'rnnengine' has no attribute {name!r}")
    _load_core()
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# The functions below import the runtime on first call: the compiled core is loaded then,
# not at `import rnnengine` (these imports implement the lazy loading; no circle hides here).

def convert(source: Any, fixed_inputs: dict[str, Any] | None = None,
            state_pairs: list[tuple[str, str]] | None = None, limits: Limits | None = None,
            weight_dtype: str = "float32", threads: int = 1) -> Model:
    """Converts an ONNX model (a path, a ModelProto, or its serialized bytes) into a runnable
    :class:`Model`.
    ``fixed_inputs`` (name -> value) bakes inputs in as constants (e.g. a sample rate);
    ``state_pairs`` [(input, output), ...] overrides the automatic pairing of explicit
    state inputs and outputs. ``limits`` (a :class:`Limits`) bounds the conversion and the
    model's later planning (default: ``rnnengine.limits.defaults()``). ``weight_dtype``
    ("float32", "float16", "int8"): the storage of the recurrent kernels' weights;
    ``threads``: how many threads ``run()`` may split the batch rows over (when every row is
    provably independent; ``model.thread_split_reason`` says why not otherwise). Raises
    :class:`ConversionError` (naming the node and the reason) for what it cannot run exactly."""
    from rnnengine import limits as _limits
    _load_core()
    from rnnengine.frontend.converter import convert_model
    from rnnengine.runtime.compact import configure
    from rnnengine.runtime.graph import GraphModel
    lim = _limits.resolve(limits) if limits is not None else None
    with _limits.using(lim):
        graph, tensors, metadata = convert_model(source, fixed_inputs, state_pairs)
    model = GraphModel(graph, tensors, metadata)
    model.limits = lim
    configure(model, weight_dtype, threads)
    return model


def load_onnx(source: Any) -> Model:
    """Deprecated: the same as :func:`convert` (the one way in for ONNX files)."""
    warnings.warn("rnnengine.load_onnx() is rnnengine.convert() now; call convert()", DeprecationWarning,
                  stacklevel=2)
    return convert(source)


def save(model: Model, path: str, dtype: str = "float32") -> None:
    """Writes a model to a weight file (docs/FORMAT.md); the weight matrices are stored as
    ``dtype``: "float32", "float16" or "int8" (one scale per row). :func:`load` reads it
    back as a converted graph. A model built from layers is written as the ONNX graph of
    its layers (rnnengine.frontend.layer_export), which cannot hold an LSTM projection
    (proj_size) or a model-defined initial state (refused, ConversionError)."""
    _load_core()
    from rnnengine.format.store import save as _save
    from rnnengine.frontend.layer_export import layers_to_onnx
    from rnnengine.runtime.model import LayerModel
    if isinstance(model, LayerModel):
        model = convert(layers_to_onnx(model))
    _save(model, path, dtype)


def load(path: str, verify: bool = True, limits: Limits | None = None, mmap: bool = False,
         weight_dtype: str | None = None, threads: int = 1, shared: bool | str = False) -> Model:
    """Loads a weight file written by :func:`save` or ``rnnengine convert`` as a
    :class:`Model`. ``verify`` checks the file's checksums first. The file is read into
    private memory (float32 weights are views of it); ``mmap=True`` maps it instead, shared
    through the page cache, and checks before every run and stream step that it was not
    truncated or replaced (docs/FORMAT.md). ``limits`` (a :class:`Limits`) bounds the
    reading and the model's later planning (default: ``rnnengine.limits.defaults()``).
    ``weight_dtype``: the storage the recurrent kernels read (None: as the file stores it, so
    float16 / int8 weights reach the compact kernels exactly as stored); ``threads`` as for
    :func:`convert`. ``shared=True`` (implies ``mmap=True``) also maps the recurrent layers'
    packed weights from the panel cache beside the file (``path + ".panels"``, or the path
    given as ``shared``), written on first use and checked against the model before every
    use, so that processes serving the same file share one copy of the weights
    (docs/FORMAT.md, "The panel cache"). Raises :class:`FormatError` for a damaged file."""
    _load_core()
    from rnnengine.format.store import load as _load
    return _load(path, verify, limits=limits, mmap=mmap, weight_dtype=weight_dtype, threads=threads,
                 shared=shared)
