"""One recurrent layer built from ONNX-layout weights and attributes (LSTM, GRU, RNN).

A layer object checks its weights and attributes against the ONNX operator spec once,
at construction, and can be called like the ONNX operator itself::

    lstm = rnnengine.LSTM(W, R, B, direction="bidirectional")
    Y, Y_h, Y_c = lstm(X, sequence_lens=lens)

Layers are stacked into a :class:`rnnengine.Model` for multi-layer runs and streaming.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from rnnengine import _core
from rnnengine.codes import (ACT_AFFINE, ACT_ELU, ACT_HARD_SIGMOID, ACT_LEAKY_RELU, ACT_RELU, ACT_SCALED_TANH,
                                 ACT_SIGMOID, ACT_SOFTPLUS, ACT_SOFTSIGN, ACT_TANH, ACT_THRESHOLDED_RELU, DIRECTIONS,
                                 GATES)

# name -> (C kind, takes alpha, takes beta, default alpha, default beta).
# Defaults are those of the ONNX operators of the same name where onnxruntime's LSTM/GRU/RNN
# take the same (HardSigmoid, LeakyRelu, Elu). None: no default both agree on, so the value
# must be given: for Affine's alpha and beta, ThresholdedRelu's alpha and ScaledTanh's alpha
# and beta, the standalone operators' defaults (1.0; 1.0, 1.0) differ from what onnxruntime's
# recurrent operators take when the values are left out (0). Computing either would differ
# from one of them without an error, so a model leaving them out is refused by name
# (exporters spell them out).
ACTIVATIONS: dict[str, tuple[int, bool, bool, float | None, float | None]] = {
    "Relu": (ACT_RELU, False, False, 0.0, 0.0),
    "Tanh": (ACT_TANH, False, False, 0.0, 0.0),
    "Sigmoid": (ACT_SIGMOID, False, False, 0.0, 0.0),
    "Affine": (ACT_AFFINE, True, True, None, None),
    "LeakyRelu": (ACT_LEAKY_RELU, True, False, 0.01, 0.0),
    "ThresholdedRelu": (ACT_THRESHOLDED_RELU, True, False, None, 0.0),
    "ScaledTanh": (ACT_SCALED_TANH, True, True, None, None),
    "HardSigmoid": (ACT_HARD_SIGMOID, True, True, 0.2, 0.5),
    "Elu": (ACT_ELU, True, False, 1.0, 0.0),
    "Softsign": (ACT_SOFTSIGN, False, False, 0.0, 0.0),
    "Softplus": (ACT_SOFTPLUS, False, False, 0.0, 0.0),
}
_ACT_BY_LOWER = {k.lower(): k for k in ACTIVATIONS}


def float_array(value: Any, what: str, ndim: int | None = None) -> np.ndarray:
    """``value`` as a C-contiguous float32 array; refuses non-float data by name."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise TypeError(f"{what} must be a float array, got dtype {arr.dtype}")
    if arr.dtype.kind in "iu":
        raise TypeError(f"{what} must be a float array (float32 preferred), got integer dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dimensions, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def resolve_activations(kind: str, n_per_dir: int, num_dirs: int, activations: Any, alphas: Any,
                        betas: Any) -> list[list[tuple[int, float, float]]]:
    """ONNX ``activations``/``activation_alpha``/``activation_beta`` -> [(kind, a, b)] per
    direction. alpha and beta lists are consumed in order by the functions that take them;
    missing entries take the function's default where it has one both onnxruntime and the
    ONNX operator agree on (ACTIVATIONS), else raise. A list of n_per_dir activations for a
    bidirectional layer is used for both directions, and so are its alpha and beta lists."""
    defaults = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}[kind]
    names = list(activations) if activations is not None else defaults * num_dirs
    alphas = [float(a) for a in (alphas or [])]
    betas = [float(b) for b in (betas or [])]
    if len(names) == n_per_dir and num_dirs == 2:
        # one direction's functions for both: with their alpha / beta values, each direction
        # consuming the same ones (not the second direction left with the defaults)
        names, alphas, betas = names * 2, alphas * 2, betas * 2
    if len(names) != n_per_dir * num_dirs:
        raise ValueError(f"{kind} with {num_dirs} direction(s) needs {n_per_dir * num_dirs} activations "
                         f"({n_per_dir} per direction), got {len(names)}: {names}")
    ia = ib = 0
    out = []
    for raw in names:
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        canon = _ACT_BY_LOWER.get(name.lower())
        if canon is None:
            raise ValueError(f"unknown activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
        ckind, has_a, has_b, da, db = ACTIVATIONS[canon]
        a, b = da, db
        if has_a and ia < len(alphas):
            a = alphas[ia]
            ia += 1
        if has_b and ib < len(betas):
            b = betas[ib]
            ib += 1
        for value, what in ((a, "alpha"), (b, "beta")):
            if value is None:
                raise ValueError(f"activation {canon} needs its {what} given (activation_{what}): the ONNX "
                                 f"recurrent operators define no default for it, and onnxruntime (0) and "
                                 f"the {canon} operator (1.0) differ")
        assert a is not None and b is not None
        out.append((ckind, a, b))
    if ia < len(alphas) or ib < len(betas):
        raise ValueError(f"activation_alpha {alphas} / activation_beta {betas} have more values than "
                         f"the activations {names} take")
    per_dir = [out[d * n_per_dir:(d + 1) * n_per_dir] for d in range(num_dirs)]
    for acts in per_dir:
        acts += [(ACT_RELU, 0.0, 0.0)] * (3 - len(acts))  # unused slots
    return per_dir


class _Layer:
    """Common part of LSTM, GRU and RNN layers (see those classes)."""

    kind = ""
    gates = 0
    n_activations = 0

    def __init__(self, W: Any, R: Any, B: Any = None, P: Any = None, *, hidden_size: int | None = None,
                 direction: str | bytes = "forward",
                 activations: Any = None, activation_alpha: Any = None, activation_beta: Any = None,
                 clip: float | None = None, input_forget: int = 0, linear_before_reset: int = 0, layout: int = 0,
                 name: str | None = None, projection: Any = None) -> None:
        self.name = name or self.kind
        who = f"{self.kind} {self.name!r}" if name else self.kind
        if isinstance(direction, bytes):
            direction = direction.decode()
        if not isinstance(direction, str) or direction not in DIRECTIONS:
            raise ValueError(f"{who}: direction must be one of {tuple(DIRECTIONS)}, got {direction!r}")
        self.direction = direction
        D = 2 if direction == "bidirectional" else 1
        self.num_directions = D
        if W is None or R is None:
            raise ValueError(f"{who}: the weights W and R are required")
        W = float_array(W, f"{who}: W", 3)
        R = float_array(R, f"{who}: R", 3)
        G = self.gates
        if W.shape[0] != D:
            raise ValueError(f"{who}: W has {W.shape[0]} direction(s) (shape {W.shape}), "
                             f"direction={direction!r} needs {D}")
        if W.shape[1] % G:
            raise ValueError(f"{who}: W must have shape ({D}, {G}*hidden_size, input_size), got {W.shape}")
        H = W.shape[1] // G
        if hidden_size is not None and int(hidden_size) != H:
            raise ValueError(f"{who}: hidden_size={hidden_size} but W has shape {W.shape} "
                             f"(hidden_size {H})")
        if H <= 0 or W.shape[2] <= 0:
            raise ValueError(f"{who}: W has an empty dimension: {W.shape}")
        I = W.shape[2]
        # an output projection (LSTM only; PyTorch's proj_size): h and the output have Hh floats
        Hh = H
        if projection is not None:
            if self.kind != "LSTM":
                raise ValueError(f"{who}: an output projection exists only for LSTM (PyTorch proj_size)")
            projection = float_array(projection, f"{who}: projection", 3)
            if projection.shape[0] != D or projection.shape[2] != H or projection.shape[1] <= 0:
                raise ValueError(f"{who}: projection must have shape ({D}, proj_size, {H}), got {projection.shape}")
            Hh = projection.shape[1]
        if R.shape != (D, G * H, Hh):
            extra = " (its last dimension is proj_size, from the projection)" if projection is not None else ""
            raise ValueError(f"{who}: R must have shape ({D}, {G * H}, {Hh}){extra}, got {R.shape}")
        if B is not None:
            B = float_array(B, f"{who}: B", 2)
            if B.shape != (D, 2 * G * H):
                raise ValueError(f"{who}: B must have shape ({D}, {2 * G * H}), got {B.shape}")
        if P is not None:
            if self.kind != "LSTM":
                raise ValueError(f"{who}: peepholes P exist only for LSTM")
            P = float_array(P, f"{who}: P", 2)
            if P.shape != (D, 3 * H):
                raise ValueError(f"{who}: P must have shape ({D}, {3 * H}), got {P.shape}")
        if clip is not None:
            clip = float(clip)
            if not clip > 0 or not np.isfinite(clip):
                raise ValueError(f"{who}: clip must be a positive finite number, got {clip}")
        if int(layout) not in (0, 1):
            raise ValueError(f"{who}: layout must be 0 or 1, got {layout}")
        if int(input_forget) not in (0, 1):
            raise ValueError(f"{who}: input_forget must be 0 or 1, got {input_forget}")
        if int(linear_before_reset) not in (0, 1):
            raise ValueError(f"{who}: linear_before_reset must be 0 or 1, got {linear_before_reset}")
        self.W, self.R, self.B, self.P = W, R, B, P
        self.projection = projection
        self.input_size, self.hidden_size = I, H
        self.proj_size = Hh if projection is not None else 0
        self.clip = clip
        self.input_forget = int(input_forget)
        self.linear_before_reset = int(linear_before_reset)
        self.layout = int(layout)
        self.activations = activations
        self.activation_alpha = activation_alpha
        self.activation_beta = activation_beta
        try:
            self._acts = resolve_activations(self.kind, self.n_activations, D, activations,
                                             activation_alpha, activation_beta)
        except ValueError as e:
            raise ValueError(f"{who}: {e}") from None
        self._single: Any = None  # this layer's own one-layer _core.Stack, made at the first call

    @property
    def h_size(self) -> int:
        """Floats of h per direction (and of the output): proj_size when projected, else hidden_size."""
        return self.proj_size or self.hidden_size

    @property
    def output_size(self) -> int:
        """Features per time step this layer gives the next one: directions * h_size."""
        return self.num_directions * self.h_size

    def _spec(self) -> dict[str, Any]:
        """The description the C core's Stack is built from."""
        cells = []
        for d in range(self.num_directions):
            cells.append({
                "act": self._acts[d], "clip": self.clip, "input_forget": self.input_forget,
                "linear_before_reset": self.linear_before_reset,
                "W": self.W[d], "R": self.R[d],
                "B": None if self.B is None else self.B[d],
                "P": None if self.P is None else self.P[d],
                "Whr": None if self.projection is None else self.projection[d],
            })
        return {"kind": self.kind, "direction": self.direction, "input_size": self.input_size,
                "hidden_size": self.hidden_size, "cells": cells,
                "step_mask": getattr(self, "step_mask", 0), "proj_size": self.proj_size}

    def __repr__(self) -> str:
        proj = f", proj_size={self.proj_size}" if self.proj_size else ""
        return (f"{self.kind}(input_size={self.input_size}, hidden_size={self.hidden_size}{proj}, "
                f"direction={self.direction!r})")

    def __call__(self, X: Any, sequence_lens: Any = None, initial_h: Any = None,
                 initial_c: Any = None) -> tuple[np.ndarray, ...]:
        """Runs the layer exactly as the ONNX operator would, in this layer's ``layout``.

        Returns ``(Y, Y_h)`` (GRU, RNN) or ``(Y, Y_h, Y_c)`` (LSTM) with ONNX shapes:
        layout 0: Y (T, D, B, H), Y_h (D, B, H); layout 1: Y (B, T, D, H), Y_h (B, D, H).
        With a projection, Y, Y_h and initial_h have proj_size where H is written (Y_c keeps H).
        """
        if self._single is None:
            self._single = _core.Stack([self._spec()])
        return run_onnx(self, self._single, X, sequence_lens, initial_h, initial_c)


class LSTM(_Layer):
    """ONNX LSTM layer. W (D, 4H, I), R (D, 4H, H), B (D, 8H), P (D, 3H); gates i, o, f, c.

    ``projection`` (D, proj_size, H) adds PyTorch's output projection (nn.LSTM(proj_size)),
    which no ONNX operator has: h = projection @ (o * h(c)) has proj_size floats, R is then
    (D, 4H, proj_size), and c keeps H floats. :func:`rnnengine.from_torch` builds these."""
    kind, n_activations = "LSTM", 3
    gates = GATES[kind]

    def __init__(self, W: Any, R: Any, B: Any = None, P: Any = None, projection: Any = None, **attrs: Any) -> None:
        if attrs.get("linear_before_reset"):
            raise ValueError("LSTM has no linear_before_reset attribute")
        super().__init__(W, R, B, P, projection=projection, **attrs)


class GRU(_Layer):
    """ONNX GRU layer. W (D, 3H, I), R (D, 3H, H), B (D, 6H); gates z, r, h."""
    kind, n_activations = "GRU", 2
    gates = GATES[kind]

    def __init__(self, W: Any, R: Any, B: Any = None, **attrs: Any) -> None:
        if attrs.get("input_forget"):
            raise ValueError("GRU has no input_forget attribute")
        super().__init__(W, R, B, None, **attrs)


class RNN(_Layer):
    """ONNX simple RNN layer. W (D, H, I), R (D, H, H), B (D, 2H)."""
    kind, n_activations = "RNN", 1
    gates = GATES[kind]

    def __init__(self, W: Any, R: Any, B: Any = None, **attrs: Any) -> None:
        for bad in ("input_forget", "linear_before_reset"):
            if attrs.get(bad):
                raise ValueError(f"RNN has no {bad} attribute")
        super().__init__(W, R, B, None, **attrs)


def layer_from_onnx(kind: str, attrs: dict[str, Any], W: Any, R: Any, B: Any = None, P: Any = None,
                    name: str | None = None) -> _Layer:
    """An LSTM / GRU / RNN layer from an ONNX node's attributes (a dict of Python values;
    strings may be bytes) and its constant weights."""
    at = attrs
    acts, direction = at.get("activations"), at.get("direction", "forward")
    if isinstance(direction, bytes):
        direction = direction.decode()
    cls: type[_Layer] | None = {"LSTM": LSTM, "GRU": GRU, "RNN": RNN}.get(kind)
    n_per_dir = cls.n_activations if cls is not None else 0
    if direction == "bidirectional" and acts is not None and len(acts) == n_per_dir:
        # the operator takes n_per_dir functions per direction (onnxruntime refuses a short
        # list); the Python layers' shorthand (one list for both) is not guessed for a file
        raise ValueError(f"{kind} is bidirectional and lists {n_per_dir} activations; the operator takes "
                         f"{2 * n_per_dir} ({n_per_dir} per direction, forward first)")
    kwargs = dict(hidden_size=at.get("hidden_size"), direction=at.get("direction", "forward"),
                  activations=at.get("activations"), activation_alpha=at.get("activation_alpha"),
                  activation_beta=at.get("activation_beta"), clip=at.get("clip"), layout=at.get("layout", 0),
                  name=name)
    if kind == "LSTM":
        return LSTM(W, R, B, P, input_forget=at.get("input_forget", 0), **kwargs)
    if kind == "GRU":
        return GRU(W, R, B, linear_before_reset=at.get("linear_before_reset", 0), **kwargs)
    return RNN(W, R, B, **kwargs)


# --- the state and sequence layout of a stack of layers (rnnengine.Model built from layers) ---

def as_lengths(lengths: Any, B: int, T: int, what: str = "lengths") -> np.ndarray | None:
    if lengths is None:
        return None
    arr = np.asarray(lengths)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{what} must be an integer array, got dtype {arr.dtype}")
    if arr.shape != (B,):
        raise ValueError(f"{what} must have shape ({B},) (one length per batch row), got {arr.shape}")
    if B and (arr.min() < 0 or arr.max() > T):
        bad = arr[(arr < 0) | (arr > T)]
        raise ValueError(f"{what} must lie in [0, {T}] (T = {T}), got {bad.tolist()}")
    return np.ascontiguousarray(arr, dtype=np.int32)


def sequence_input(X: Any, input_size: int, batch_first: bool, what: str = "X") -> tuple[np.ndarray, int, int]:
    """Checks a whole-sequence input; returns (X as float32, T, batch)."""
    X = float_array(X, what)
    if X.ndim == 2:
        raise ValueError(f"{what} must have 3 dimensions "
                         f"({'batch, T' if batch_first else 'T, batch'}, {input_size}), "
                         f"got shape {X.shape}; add a batch axis for a single sequence")
    if X.ndim != 3:
        raise ValueError(f"{what} must have 3 dimensions "
                         f"({'batch, T' if batch_first else 'T, batch'}, {input_size}), "
                         f"got shape {X.shape}")
    if X.shape[2] != input_size:
        raise ValueError(f"{what} has {X.shape[2]} features per step (shape {X.shape}), "
                         f"the model expects {input_size}")
    B, T = (X.shape[0], X.shape[1]) if batch_first else (X.shape[1], X.shape[0])
    return X, T, B


def layer_key(k: int) -> str:
    """The key of layer ``k`` of a layer stack in State["layers"] (also the name of its
    output in the ONNX graph ``rnnengine.save`` writes, so a saved model keeps its keys)."""
    return f"layer{k}"


def pack_state(layers: list[_Layer], state: Any, batch: int, broadcast: bool = False) -> np.ndarray:
    """The state (:class:`rnnengine.State`: {"layers": {"layer0": (h, c) or h, ...}}) -> the
    C core's flat vector, every entry checked: one entry per layer; (h, c) for an LSTM layer,
    h alone otherwise; each a float array of shape (num_directions, batch, hidden_size)
    ("inputs" and "context", when given, must be empty: a layer stack has neither).
    ``broadcast``: a batch of 1 stands for every row (a model's initial state)."""
    keys = [layer_key(k) for k in range(len(layers))]
    structure = ("{'layers': {" + ", ".join(f"{key!r}: {'(h, c)' if layer.kind == 'LSTM' else 'h'}"
                                           for key, layer in zip(keys, layers)) + "}}, as get_state() returns")

    def shape_of(layer: _Layer) -> str:
        if layer.proj_size:
            return (f"({layer.num_directions}, {batch}, {layer.h_size}) for h (proj_size) and "
                    f"({layer.num_directions}, {batch}, {layer.hidden_size}) for c")
        return f"({layer.num_directions}, {batch}, {layer.hidden_size})"
    if not isinstance(state, dict):
        hint = (" (a per-layer list as PyTorch's is not taken: put each layer's entry under its key)"
                if isinstance(state, (list, tuple)) else "")
        raise TypeError(f"state must be a dict {structure}; got {type(state).__name__}{hint}")
    unknown = sorted(map(str, set(state) - {"layers", "inputs", "context"}))
    if unknown:
        raise ValueError(f"state has unknown key(s) {unknown}; a stream's state is {structure}")
    for part in ("inputs", "context"):
        got = state.get(part, {})
        if not isinstance(got, dict):
            raise TypeError(f"state[{part!r}] must be a dict, got {type(got).__name__}")
        if got:
            raise ValueError(f"state[{part!r}] has {sorted(map(str, got))}, but a layer stack has no "
                             f"{'explicit state inputs' if part == 'inputs' else 'ops along time'}")
    entries = state.get("layers")
    if not isinstance(entries, dict):
        raise TypeError(f"state['layers'] must be a dict {structure}; got {type(entries).__name__}")
    extra = sorted(map(str, set(entries) - set(keys)))
    if extra:
        raise ValueError(f"state['layers'] has {extra}, which this model does not have (its layers: {keys})")
    missing = [key for key in keys if key not in entries]
    if missing:
        raise ValueError(f"state['layers'] is missing {missing} (a state gives every layer: {structure})")
    parts = []
    for key, layer in zip(keys, layers):
        entry = entries[key]
        label = f"state['layers'][{key!r}]"
        want_h = (layer.num_directions, batch, layer.h_size)
        want_c = (layer.num_directions, batch, layer.hidden_size)
        if layer.kind == "LSTM":
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                got = (f"a {type(entry).__name__} of {len(entry)}" if isinstance(entry, (list, tuple))
                       else f"a {type(entry).__name__}")
                raise ValueError(f"{label} of an LSTM layer must be a pair (h, c) of arrays "
                                 f"{shape_of(layer)}, got {got}")
            arrays = [("h", entry[0]), ("c", entry[1])]
        else:
            if isinstance(entry, (list, tuple)):
                raise ValueError(f"{label} of a {layer.kind} layer is h alone, an array {shape_of(layer)} "
                                 f"(only LSTM layers have a pair (h, c)), got a {type(entry).__name__} "
                                 f"of {len(entry)}")
            arrays = [("h", entry)]
        for nm, a in arrays:
            want = want_c if nm == "c" else want_h
            what_ = f"{label} {nm}" if layer.kind == "LSTM" else label
            a = float_array(a, what_)
            if broadcast and a.shape == (want[0], 1, want[2]):
                a = np.broadcast_to(a, want)
            if a.shape != want:
                what = "proj_size" if nm == "h" and layer.proj_size else "hidden"
                raise ValueError(f"{what_} must have shape {want} (directions, batch, {what}), got {a.shape}")
            parts.append(a.reshape(-1))
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def unpack_state(layers: list[_Layer], vec: np.ndarray, batch: int) -> dict[str, Any]:
    """The flat state vector of the C core -> the state (:class:`rnnengine.State`, copies)."""
    out: dict[str, Any] = {}
    off = 0
    for k, layer in enumerate(layers):
        shape = (layer.num_directions, batch, layer.h_size)
        n = int(np.prod(shape))
        h = vec[off:off + n].reshape(shape).copy()
        off += n
        if layer.kind == "LSTM":
            shape = (layer.num_directions, batch, layer.hidden_size)  # c: hidden_size, also projected
            n = int(np.prod(shape))
            c = vec[off:off + n].reshape(shape).copy()
            off += n
            out[layer_key(k)] = (h, c)
        else:
            out[layer_key(k)] = h
    return {"layers": out, "inputs": {}, "context": {}}


def run_onnx(layer: _Layer, stack: Any, X: Any, sequence_lens: Any, initial_h: Any,
             initial_c: Any) -> tuple[np.ndarray, ...]:
    """One-layer ONNX operator semantics (LSTM/GRU/RNN.__call__); ``stack`` is the layer's own
    one-layer _core.Stack."""
    layout = layer.layout
    X, T, B = sequence_input(X, layer.input_size, bool(layout))
    D, H, Hh = layer.num_directions, layer.hidden_size, layer.h_size  # Hh: h and Y (proj_size)
    lens = as_lengths(sequence_lens, B, T, "sequence_lens")

    def initial(value: Any, nm: str) -> np.ndarray:
        n = H if nm == "initial_c" else Hh
        state_shape = (B, D, n) if layout else (D, B, n)
        if value is None:
            return np.zeros((D, B, n), np.float32)
        v = float_array(value, nm)
        if v.shape != state_shape:
            raise ValueError(f"{nm} must have shape {state_shape} "
                             f"({'batch, directions' if layout else 'directions, batch'}, hidden), "
                             f"got {v.shape}")
        return v.transpose(1, 0, 2) if layout else v

    if initial_c is not None and layer.kind != "LSTM":
        raise ValueError(f"initial_c is an LSTM input; {layer.kind} has none")
    h0 = initial(initial_h, "initial_h")
    entry = (h0, initial(initial_c, "initial_c")) if layer.kind == "LSTM" else h0
    st = pack_state([layer], {"layers": {layer_key(0): entry}}, B)
    Y = np.zeros((B, T, D, Hh) if layout else (T, D, B, Hh), np.float32)
    if T and B:
        if layout:
            ys_t, ys_b, ys_d = D * Hh, T * D * Hh, Hh
        else:
            ys_t, ys_b, ys_d = D * B * Hh, Hh, B * Hh
        work = np.empty(stack.workspace_size(T, B), np.float32)
        stack.forward(X, lens, Y.reshape(-1), ys_t, ys_b, ys_d, st, work, bool(layout))
    final = unpack_state([layer], st, B)["layers"][layer_key(0)]
    final = list(final) if layer.kind == "LSTM" else [final]
    for k, a in enumerate(final):
        if lens is not None:
            a[:, lens == 0, :] = 0.0  # onnxruntime: a row of length 0 has Y_h = Y_c = 0
        final[k] = np.ascontiguousarray(a.transpose(1, 0, 2)) if layout else a
    return (Y, *final)
