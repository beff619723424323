"""rnnengine: fast, faithful CPU inference for LSTM, GRU and RNN models from ONNX."""
from ._core import Stream, step_streams
from .layers import GRU, LSTM, RNN, ACTIVATIONS
from .model import Model, load_onnx

__all__ = ["LSTM", "GRU", "RNN", "Model", "Stream", "step_streams", "load_onnx", "ACTIVATIONS", "convert"]
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
