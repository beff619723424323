"""The one model type and the one stream type users learn, whatever the model came from.

``rnnengine.Model`` and ``rnnengine.Stream`` are abstract: every model is a ``Model`` and
every stream a ``Stream``, with the methods below, whether it was built from layers
(``Model([LSTM(...), ...])``, ``from_torch``), converted from ONNX (``convert``), loaded
from a weight file (``load``) or trained (``train.Network``). Two runtimes sit behind them,
chosen by what the model is, not by the user: a stack of recurrent layers runs through the
C stack directly (runtime/model.py, the microsecond path), any other graph through the
planner and the C graph executor (runtime/graph.py).

The calling convention is the same for both (``run``, ``step`` and ``feed`` alike): a dict
name -> array in gives a dict name -> array out; one array in (the model's one data input)
gives the outputs in ``model.outputs`` order, a single array when there is one.
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar, Mapping, Sequence, TypedDict, Union, cast

import numpy as np
import numpy.typing as npt

from rnnengine import _core

__all__ = ["Model", "Stream", "State", "LayerState", "step_streams"]

# One stateful node's state in State["layers"]: a recurrent layer's (h, c) (LSTM) or h
# (GRU, RNN), each float32 (num_directions, batch, hidden_size) as in PyTorch (h of a
# projected LSTM: proj_size); a Loop's carried value or a convolution's kept frames: one array.
LayerState = Union[npt.NDArray[np.float32], tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]]


class State(TypedDict):
    """Every stream's state, whatever the model, as ``get_state()`` returns it and
    ``set_state()``, ``Model.stream(state=)`` and ``Model.run(state=)`` take it::

        {"layers":  {key: (h, c) | h | array},   # each stateful node the stream holds
         "inputs":  {name: array},               # a graph's explicit state inputs
         "context": {key: int}}                  # what ops along time carry

    "layers": keyed by the node's first output: "layer0", "layer1", ... for a model built
    from layers (also the names ``rnnengine.save`` gives them, so a saved and loaded model
    takes the same state), the recurrent node's first output name for a converted graph.
    A recurrent layer's entry is ``(h, c)`` for an LSTM and ``h`` otherwise, each float32
    (num_directions, batch, hidden_size) as in PyTorch; a Loop's carried value
    ("<output>:loop<k>") and a convolution's kept input frames ("conv:<output>") are one
    array each. "inputs": one array per state input of a graph's ``state_pairs`` (its
    dtype and shape); empty for a layer stack. "context": per convolution along time the
    frames it keeps (negative: still skips), per Pad whether its leading padding was given;
    empty for a layer stack. Every part is checked before anything changes, and a mistake
    raises TypeError / ValueError naming the entry."""
    layers: dict[str, LayerState]
    inputs: dict[str, npt.NDArray[Any]]
    context: dict[str, int]


class Model(abc.ABC):
    """A recurrent model ready to run.

    Build one from layers with ``Model(layers, batch_first=False, initial_state=None,
    weight_dtype="float32", threads=1)`` (see :class:`rnnengine.runtime.model.LayerModel`),
    or get one from :func:`rnnengine.convert`, :func:`rnnengine.load` or
    :func:`rnnengine.from_torch`.

    Attributes every model has: ``outputs`` (output names, in the order ``run`` returns
    them for an array input), ``input_names`` (the inputs a caller feeds), ``threads`` (how
    many threads ``run`` may split the batch rows over) and ``weight_dtype`` (the storage of
    the recurrent weights the kernels read: "float32", "float16" or "int8").
    """

    # the layer-stack implementation, registered by rnnengine.runtime.model (which imports
    # this module, so the registry avoids an import circle)
    _layer_type: ClassVar[type[Model] | None] = None

    outputs: list[str]
    threads: int
    weight_dtype: str

    def __new__(cls, *args: Any, **kwargs: Any) -> Model:
        if cls is Model:  # Model(layers, ...) builds the layer-stack model
            if Model._layer_type is None:
                raise ImportError("rnnengine.runtime.model is not imported; use rnnengine.Model")
            return super().__new__(Model._layer_type)
        return super().__new__(cls)

    @property
    @abc.abstractmethod
    def input_names(self) -> list[str]:
        """The inputs a caller feeds (a stream carries the model's state inputs itself)."""

    @abc.abstractmethod
    def run(self, inputs: Any, lengths: Any = None, state: Any = None) -> Any:
        """Runs whole sequences, no state kept. ``inputs``: a dict name -> array, or the one
        array of a model with one data input. Returns a dict for a dict, else the outputs in
        ``outputs`` order (a single array when there is one). ``lengths``: valid steps per
        batch row (packed sequences). ``state``: the state to start from (:class:`State`,
        as a stream's ``get_state()`` returns it; zeros or the model's initial state when
        omitted)."""

    @abc.abstractmethod
    def stream(self, batch_size: int | None = None, state: Any = None) -> Stream:
        """A :class:`Stream` over ``batch_size`` rows that keeps every recurrent state
        between calls, starting from ``state`` (default: the model's initial state).
        Raises :class:`rnnengine.errors.NotStreamableError` (naming the node and the reason)
        when a chunk-by-chunk run could differ from the whole-sequence run."""


class Stream(abc.ABC):
    """Recurrent state kept between calls, for one sequence per batch row.

    ``step(x)`` advances one time step (x without a time axis), ``feed(xs)`` a chunk of
    steps (xs with its time axis); both take a dict name -> array or the one data array and
    return the same kind, like :meth:`Model.run`. Feeding a sequence in any chunking gives
    the whole-sequence result. ``get_state()`` / ``set_state(state)`` copy the state out and
    back, in the one structure of :class:`State` for every model (validated before anything
    changes), ``reset()`` returns to the model's initial
    state, ``fork()`` gives an independent copy, ``finish()`` returns what ops that look
    ahead in time still hold back (``delay`` input steps; nothing for a layer stack).
    A stream is used by one thread at a time: a call that overlaps another thread's call on
    the same stream raises RuntimeError instead of losing steps.
    """

    batch_size: int | None
    delay: int

    @abc.abstractmethod
    def step(self, x: Any, out: Any = None) -> Any: ...

    @abc.abstractmethod
    def feed(self, xs: Any, out: Any = None) -> Any: ...

    @abc.abstractmethod
    def get_state(self) -> State: ...

    @abc.abstractmethod
    def set_state(self, state: State | Mapping[str, Any]) -> None: ...

    @abc.abstractmethod
    def reset(self) -> None: ...

    @abc.abstractmethod
    def fork(self) -> Stream: ...

    @abc.abstractmethod
    def finish(self) -> Any: ...


def step_streams(streams: Sequence[Stream], xs: Any, out: Any = None) -> Any:
    """Advances several independent streams by one step each: ``xs[i]`` is stream i's
    input. Single-row streams of one layer-stack model run as one batched C call
    (``xs`` (n, input_size) -> (n, output_size)); any other streams are stepped in turn and
    their outputs returned as a list (stacked into one array when they are arrays of one
    shape). The batched call is all or nothing; stepped in turn, streams before a failing
    one have advanced when its error is raised."""
    streams = list(streams)
    if not streams:
        raise ValueError("step_streams() needs at least one stream")
    if all(isinstance(s, _core.Stream) for s in streams):  # the layer stack's C streams: one batched call
        return _core.step_streams(cast("list[Any]", streams), xs, out)
    for i, s in enumerate(streams):
        if not isinstance(s, Stream):
            raise TypeError(f"streams[{i}] is a {type(s).__name__}, not a Stream")
    if isinstance(xs, Mapping) or len(xs) != len(streams):
        raise ValueError(f"xs must hold one input per stream ({len(streams)}), "
                         f"got {type(xs).__name__} of length {len(xs)}")
    results = [s.step(x) for s, x in zip(streams, xs)]
    if out is not None:
        raise ValueError("out= is only taken when every stream is a single-row layer-stack stream")
    if all(isinstance(r, np.ndarray) for r in results) and len({r.shape for r in results}) == 1:
        return np.stack(results)
    return results
