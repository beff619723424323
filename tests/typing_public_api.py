"""Pins the static types of the graph runtime's public API (checked by `mypy`, which lists this
file in pyproject.toml; never run): a dict in gives a dict out, one array in gives the outputs
in order, streams and their state keep their types."""
from __future__ import annotations

from typing import Any, assert_type

import numpy as np
import numpy.typing as npt

from rnnengine.runtime.base import LayerState, State
from rnnengine.runtime.graph import GraphModel, GraphStream

Array = npt.NDArray[Any]
Returned = Array | tuple[Array, ...]


def graph_model_api(m: GraphModel, x: Array, feeds: dict[str, Array]) -> None:
    assert_type(m.run(feeds), dict[str, Array])
    assert_type(m.run({"x": x}, lengths=np.array([3, 2]), state={"h0": x}), dict[str, Array])
    assert_type(m.run(x), Returned)
    assert_type(m.input_names, list[str])
    assert_type(m.outputs, list[str])
    assert_type(m.time_axes(feeds), dict[str, int])
    assert_type(m.stream(), GraphStream)
    assert_type(m.stream(batch_size=2, state=m.stream().get_state()), GraphStream)


def graph_stream_api(s: GraphStream, x: Array, feeds: dict[str, Array]) -> None:
    assert_type(s.feed(feeds), dict[str, Array])
    assert_type(s.feed(x, outputs=["y"]), Returned)
    assert_type(s.step(feeds), dict[str, Array])
    assert_type(s.step(x), Returned)
    assert_type(s(feeds), dict[str, Array])
    assert_type(s.finish(), dict[str, Array] | Returned)
    state = s.get_state()
    assert_type(state, State)
    assert_type(state["layers"], dict[str, LayerState])
    assert_type(state["inputs"], dict[str, Array])
    assert_type(state["context"], dict[str, int])
    s.set_state(state)
    s.set_state({"inputs": {"h0": x}})
    assert_type(s.fork(), GraphStream)
    assert_type(s.time_axes, dict[str, int])
    assert_type(s.delay, int)
    assert_type(s.batch_size, int | None)
    s.reset()
