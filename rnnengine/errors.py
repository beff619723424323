"""Every exception rnnengine raises on purpose, under one base class, RnnEngineError.

Each class also keeps the built-in base its meaning calls for (a refused model or bad input
is a ValueError, a failure of a peer or of the core a RuntimeError), so ``except ValueError``
written before this module existed still catches what it caught. Pure Python: importable
without the compiled core.

    RnnEngineError
    +-- UnsupportedError (ValueError)      an op, attribute or pattern rnnengine cannot run faithfully
    |   +-- ConversionError                  the ONNX model cannot be converted faithfully
    |   +-- NotStreamableError               the graph cannot be run chunk by chunk exactly
    |   +-- LimitError                       a model goes past a resource limit (rnnengine.Limits)
    +-- OpsetError (ValueError)            a node's op version is not one rnnengine implements
    +-- FormatError (ValueError)           not a valid weight file (docs/FORMAT.md)
    +-- GraphRunError (ValueError)         the graph executor stopped on bad input data
    |   +-- ProgramError                     a program refused by the C verifier before it runs
    +-- StateError (ValueError)            bytes that are not a stream state of this model
    +-- SessionClosedError (RuntimeError)  a batcher session used after it was closed
    +-- EngineError (RuntimeError)         the C core refused a call (a validation bug if a user sees it)
    +-- OnnxRuntimeError (RuntimeError)    onnxruntime (the oracle of `verify`) refused the model
"""
from __future__ import annotations

from typing import Any

__all__ = ["RnnEngineError", "UnsupportedError", "ConversionError", "NotStreamableError", "LimitError",
           "OpsetError", "FormatError", "GraphRunError", "ProgramError", "StateError", "SessionClosedError", "EngineError",
           "OnnxRuntimeError", "where"]


def where(node: dict[str, Any]) -> str:
    """How messages name a node: "<op> node '<name>'"."""
    return f"{node['op']} node {node.get('name') or '(unnamed)'!r}"


class RnnEngineError(Exception):
    """The base of every exception rnnengine raises on purpose."""


class UnsupportedError(RnnEngineError, ValueError):
    """An op, attribute or pattern rnnengine cannot run faithfully."""


class ConversionError(UnsupportedError):
    """The ONNX model cannot be converted faithfully; the message names the node."""


class NotStreamableError(UnsupportedError):
    """The graph cannot be streamed: a node on a path from a time-carrying input to an
    output mixes time steps in a way that chunk-by-chunk calls cannot reproduce exactly.
    The message reads "not streamable: <op> node '<name>': <reason>"; ``node`` and
    ``reason`` are kept as attributes."""

    def __init__(self, node: dict[str, Any] | str, reason: str) -> None:
        self.node = (node.get("name") or node.get("op", "")) if isinstance(node, dict) else str(node)
        self.reason = reason
        self.label = where(node) if isinstance(node, dict) else str(node)  # "<op> node '<name>'"
        super().__init__(f"not streamable: {self.label}: {reason}")


class LimitError(UnsupportedError):
    """A model goes past a resource limit (the message names the limit, the node, the value
    and how to raise it). A ValueError, like every refusal of a model."""


class OpsetError(RnnEngineError, ValueError):
    """A node's op version is not one rnnengine implements."""


class FormatError(RnnEngineError, ValueError):
    """The file is not a valid rnnengine weight file (the message says what is wrong)."""


class GraphRunError(RnnEngineError, ValueError):
    """The graph executor stopped on bad input data (an index or a length out of range)."""


class ProgramError(GraphRunError):
    """A program refused before it runs (rnn_graph_verify): an instruction would read or
    write outside the tensors it names, compute on element types its op does not take, or
    read parameters it was not given. The message names the node and the instruction, e.g.
    "Gemm node 'g': instruction 7 (MATMUL): input B has 12 elements, the instruction reads 48"."""


class StateError(RnnEngineError, ValueError):
    """Bytes that are not a state of this model (another model, another format version,
    damaged or truncated bytes); the message says which."""


class SessionClosedError(RnnEngineError, RuntimeError):
    """A batcher session used after close(), after its batcher closed, or after idle_timeout."""


class EngineError(RnnEngineError, RuntimeError):
    """The C core refused a call (a bug in validation if it ever reaches a user)."""


class OnnxRuntimeError(RnnEngineError, RuntimeError):
    """onnxruntime refused the model (at session creation or at run); the message carries
    the first line of onnxruntime's own message."""
