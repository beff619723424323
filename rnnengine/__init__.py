"""rnnengine: fast, faithful CPU inference for LSTM, GRU and RNN models from ONNX."""
from ._core import Stream, step_streams
from .layers import GRU, LSTM, RNN, ACTIVATIONS
from .model import Model, load_onnx
from .torch_import import from_torch

__all__ = ["LSTM", "GRU", "RNN", "Model", "Stream", "step_streams", "load_onnx", "ACTIVATIONS", "convert",
           "load", "save", "from_torch"]
__version__ = "0.1.0"


def convert(source, fixed_inputs=None, state_pairs=None):
    """Converts an ONNX model (path or ModelProto) into a runnable :class:`GraphModel`.
    ``fixed_inputs`` (name -> value) bakes inputs in as constants (e.g. a sample rate);
    ``state_pairs`` [(input, output), ...] overrides the automatic pairing of explicit
    state inputs and outputs."""
    from .converter import convert_model
    from .graph import GraphModel
    graph, tensors, metadata = convert_model(source, fixed_inputs, state_pairs)
    return GraphModel(graph, tensors, metadata)


def save(model, path, dtype="float32"):
    """Writes a converted model to a weight file (docs/FORMAT.md); the weight matrices are
    stored as ``dtype``: "float32", "float16" or "int8" (one scale per row)."""
    from .store import save as _save
    _save(model, path, dtype)


def load(path, verify=True):
    """Loads a weight file written by :func:`save` or ``rnnengine convert`` as a
    :class:`GraphModel`; float32 weights are memory-mapped, not copied. ``verify`` checks
    the file's checksums first."""
    from .store import load as _load
    return _load(path, verify)
