"""rnnengine: fast, faithful CPU inference for LSTM, GRU and RNN models from ONNX."""
from .layers import GRU, LSTM, RNN, ACTIVATIONS
from .limits import Limits

__all__ = ["LSTM", "GRU", "RNN", "Model", "Stream", "step_streams", "load_onnx", "ACTIVATIONS", "convert",
           "load", "save", "Limits"]
__version__ = "0.1.0"

# loaded on first use, so the pure-Python parts (rnnengine.fileformat, rnnengine.limits) import
# without the compiled extension
_LAZY = {"Stream": "._core", "step_streams": "._core", "Model": ".model", "load_onnx": ".model"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def convert(source, fixed_inputs=None, state_pairs=None, limits=None):
    """Converts an ONNX model (path or ModelProto) into a runnable :class:`GraphModel`.
    ``fixed_inputs`` (name -> value) bakes inputs in as constants (e.g. a sample rate);
    ``state_pairs`` [(input, output), ...] overrides the automatic pairing of explicit
    state inputs and outputs. ``limits`` (a :class:`Limits`) bounds the conversion and the
    model's later planning (default: ``rnnengine.limits.defaults()``)."""
    from . import limits as _limits
    from .converter import convert_model
    from .graph import GraphModel
    lim = _limits.resolve(limits) if limits is not None else None
    with _limits.using(lim):
        graph, tensors, metadata = convert_model(source, fixed_inputs, state_pairs)
    model = GraphModel(graph, tensors, metadata)
    model.limits = lim
    return model


def save(model, path, dtype="float32"):
    """Writes a converted model to a weight file (docs/FORMAT.md); the weight matrices are
    stored as ``dtype``: "float32", "float16" or "int8" (one scale per row)."""
    from .store import save as _save
    _save(model, path, dtype)


def load(path, verify=True, limits=None, mmap=False):
    """Loads a weight file written by :func:`save` or ``rnnengine convert`` as a
    :class:`GraphModel`. ``verify`` checks the file's checksums first. The file is read into
    private memory (float32 weights are views of it); ``mmap=True`` maps it instead, shared
    through the page cache, and checks before every run and stream step that it was not
    truncated or replaced (docs/FORMAT.md). ``limits`` (a :class:`Limits`) bounds the
    reading and the model's later planning (default: ``rnnengine.limits.defaults()``)."""
    from .store import load as _load
    return _load(path, verify, limits=limits, mmap=mmap)
