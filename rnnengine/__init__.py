"""rnnengine: fast, faithful CPU inference for LSTM, GRU and RNN models from ONNX.

The compiled core (rnnengine._core) is loaded on first use, so the pure-Python parts
(rnnengine.format.weightfile, the weight-file reader) import without it.
"""
from rnnengine._version import __version__
from rnnengine.limits import Limits

__all__ = ["LSTM", "GRU", "RNN", "Model", "Stream", "step_streams", "load_onnx", "ACTIVATIONS", "convert",
           "load", "save", "Limits", "from_torch", "__version__"]

# public name -> the module that defines it; imported on first access (PEP 562)
_LAZY = {"Stream": "._core", "step_streams": "._core", "LSTM": ".runtime.layers", "GRU": ".runtime.layers", "RNN": ".runtime.layers",
         "ACTIVATIONS": ".runtime.layers", "Model": ".runtime.model", "load_onnx": ".runtime.model",
         "from_torch": ".frontend.torch_import"}


def _core_missing(err):
    """An ImportError that says why the compiled core is missing and what to do."""
    import os
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


def _load_core():
    try:
        from rnnengine import _core
    except ImportError as err:
        if getattr(err, "name", None) in ("rnnengine._core", None) or "_core" in str(err):
            raise _core_missing(err) from err
        raise
    return _core


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'rnnengine' has no attribute {name!r}")
    _load_core()
    import importlib
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def convert(source, fixed_inputs=None, state_pairs=None, limits=None, weight_dtype="float32", threads=1):
    """Converts an ONNX model (path or ModelProto) into a runnable :class:`GraphModel`.
    ``fixed_inputs`` (name -> value) bakes inputs in as constants (e.g. a sample rate);
    ``state_pairs`` [(input, output), ...] overrides the automatic pairing of explicit
    state inputs and outputs. ``limits`` (a :class:`Limits`) bounds the conversion and the
    model's later planning (default: ``rnnengine.limits.defaults()``)."""
    from rnnengine import limits as _limits
    _load_core()
    from rnnengine.frontend.converter import convert_model
    from rnnengine.runtime.graph import GraphModel
    lim = _limits.resolve(limits) if limits is not None else None
    with _limits.using(lim):
        graph, tensors, metadata = convert_model(source, fixed_inputs, state_pairs)
    model = GraphModel(graph, tensors, metadata)
    model.limits = lim
    from rnnengine.runtime.compact import configure
    return configure(model, weight_dtype, threads)


def save(model, path, dtype="float32"):
    """Writes a converted model to a weight file (docs/FORMAT.md); the weight matrices are
    stored as ``dtype``: "float32", "float16" or "int8" (one scale per row)."""
    from rnnengine.format.store import save as _save
    _save(model, path, dtype)


def load(path, verify=True, limits=None, mmap=False, weight_dtype=None, threads=1):
    """Loads a weight file written by :func:`save` or ``rnnengine convert`` as a
    :class:`GraphModel`. ``verify`` checks the file's checksums first. The file is read into
    private memory (float32 weights are views of it); ``mmap=True`` maps it instead, shared
    through the page cache, and checks before every run and stream step that it was not
    truncated or replaced (docs/FORMAT.md). ``limits`` (a :class:`Limits`) bounds the
    reading and the model's later planning (default: ``rnnengine.limits.defaults()``)."""
    _load_core()
    from rnnengine.format.store import load as _load
    return _load(path, verify, limits=limits, mmap=mmap, weight_dtype=weight_dtype, threads=threads)
