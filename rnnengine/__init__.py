"""rnnengine: fast, faithful CPU inference for LSTM, GRU and RNN models from ONNX."""
from ._core import Stream, step_streams
from .layers import GRU, LSTM, RNN, ACTIVATIONS
from .model import Model, load_onnx

__all__ = ["LSTM", "GRU", "RNN", "Model", "Stream", "step_streams", "load_onnx", "ACTIVATIONS"]
__version__ = "0.1.0"
