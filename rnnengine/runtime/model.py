"""A stack of recurrent layers: whole-sequence runs and streams with persistent state.

State convention (as PyTorch's nn.LSTM / nn.GRU, one entry per layer): an LSTM layer's
state is a tuple ``(h, c)``, a GRU or RNN layer's state is ``h``; each array has shape
(num_directions, batch, hidden_size) (h of a projected LSTM layer: proj_size instead).
"""
from __future__ import annotations

import numpy as np

from rnnengine import _core
from rnnengine.runtime.layers import _Layer, float_array


def _as_lengths(lengths, B, T, what="lengths"):
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


def _check_compact_weights(cell, weight_dtype, where, direction):
    """Refuses weights the compact storage cannot hold exactly enough to stay honest: float16
    turns finite values above 65504 into Inf, int8 has no code for +-Inf (NaN is kept: its
    output column is NaN, as in float32)."""
    for name in ("W", "R", "Whr"):
        w = cell.get(name)
        if w is None:
            continue
        if weight_dtype == "float16":
            bad = np.isfinite(w) & (np.abs(w) > 65504.0)
            why = "exceeds the float16 range (65504)"
        else:
            bad = np.isinf(w)
            why = "is infinite, which int8 weights cannot represent"
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{where}: {name}{[direction, *at]} = {w[at]} {why}; "
                             f"use weight_dtype='float32' for these weights")


class Model:
    """A stack of recurrent layers run by the C core.

    Parameters
    ----------
    layers : list of LSTM / GRU / RNN layers; layer k+1's input_size must equal
        layer k's output_size (num_directions * hidden_size).
    batch_first : arrays are (batch, T, features) instead of (T, batch, features).
    initial_state : optional default state (see module doc) with batch size 1,
        broadcast to every row; zeros when omitted. Streams start from it and
        reset() returns to it.
    weight_dtype : "float32" (default), "float16" or "int8": how the packed weights used by
        streaming steps and short chunks are stored. float16 / int8 read 2x / 4x fewer bytes
        per step (faster for large hidden sizes, where a step is bound by memory) at an
        accuracy cost; long sequences still use the float32 weights through BLAS.
    threads : how many threads run() splits the batch rows over (each thread runs its rows
        through the whole sequence, so no synchronisation per step); 1 by default.
    """

    def __init__(self, layers, batch_first=False, initial_state=None, weight_dtype="float32", threads=1):
        layers = list(layers)
        if not layers:
            raise ValueError("a Model needs at least one layer")
        for k, layer in enumerate(layers):
            if not isinstance(layer, _Layer):
                raise TypeError(f"layers[{k}] is a {type(layer).__name__}, not an LSTM/GRU/RNN layer")
            if k and layer.input_size != layers[k - 1].output_size:
                raise ValueError(f"layers[{k}] ({layer!r}) takes input_size {layer.input_size}, but "
                                 f"layers[{k - 1}] gives {layers[k - 1].output_size} features")
        self.layers = layers
        self.batch_first = bool(batch_first)
        if weight_dtype not in ("float32", "float16", "int8"):
            raise ValueError(f"weight_dtype must be float32, float16 or int8, got {weight_dtype!r}")
        if int(threads) < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.weight_dtype = weight_dtype
        self.threads = int(threads)
        specs = [layer._spec() for layer in layers]
        for k, spec in enumerate(specs):
            for d, cell in enumerate(spec["cells"]):
                cell["weight_dtype"] = weight_dtype
                if weight_dtype != "float32":
                    _check_compact_weights(cell, weight_dtype, f"layers[{k}] ({spec['kind']})", d)
        self._stack = _core.Stack(specs)
        self.input_size = layers[0].input_size
        self.output_size = layers[-1].output_size
        self._default = None
        if initial_state is not None:
            self._default = self._pack_state(initial_state, 1)

    def __repr__(self):
        inner = ", ".join(repr(layer) for layer in self.layers)
        return f"Model([{inner}], batch_first={self.batch_first})"

    @property
    def streamable(self):
        """True when every layer runs forward in time (so it can be fed step by step)."""
        return all(layer.direction == "forward" for layer in self.layers)

    # --- state <-> the C core's flat vector ------------------------------------------
    def initial_state_vector(self, batch):
        if self._default is None:
            return np.zeros(self._stack.state_size(batch), np.float32)
        return self._pack_state(self.unpack_state(self._default, 1), batch, broadcast=True)

    def _pack_state(self, state, batch, broadcast=False):
        """The structured state (module doc) -> the C core's flat vector, every entry checked:
        a list with one entry per layer; (h, c) for an LSTM layer, h alone otherwise; each a
        float array of shape (num_directions, batch, hidden_size)."""
        def shape_of(layer):
            if layer.proj_size:
                return (f"({layer.num_directions}, {batch}, {layer.h_size}) for h (proj_size) and "
                        f"({layer.num_directions}, {batch}, {layer.hidden_size}) for c")
            return f"({layer.num_directions}, {batch}, {layer.hidden_size})"
        if not isinstance(state, (list, tuple)):
            raise TypeError(f"state must be a list with one entry per layer ({len(self.layers)}): (h, c) for an "
                            f"LSTM layer, h otherwise, as get_state() returns; got {type(state).__name__}")
        if len(state) != len(self.layers):
            raise ValueError(f"state must be a list with one entry per layer ({len(self.layers)}), "
                             f"got {type(state).__name__} of length {len(state)}")
        parts = []
        for k, (layer, entry) in enumerate(zip(self.layers, state)):
            want_h = (layer.num_directions, batch, layer.h_size)
            want_c = (layer.num_directions, batch, layer.hidden_size)
            if layer.kind == "LSTM":
                if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                    got = (f"a {type(entry).__name__} of {len(entry)}" if isinstance(entry, (list, tuple))
                           else f"a {type(entry).__name__}")
                    raise ValueError(f"state[{k}] of an LSTM layer must be a pair (h, c) of arrays "
                                     f"{shape_of(layer)}, got {got}")
                arrays = [("h", entry[0]), ("c", entry[1])]
            else:
                if isinstance(entry, (list, tuple)):
                    raise ValueError(f"state[{k}] of a {layer.kind} layer is h alone, an array {shape_of(layer)} "
                                     f"(only LSTM layers have a pair (h, c)), got a {type(entry).__name__} "
                                     f"of {len(entry)}")
                arrays = [("h", entry)]
            for nm, a in arrays:
                want = want_c if nm == "c" else want_h
                a = float_array(a, f"state[{k}] {nm}")
                if broadcast and a.shape == (want[0], 1, want[2]):
                    a = np.broadcast_to(a, want)
                if a.shape != want:
                    what = "proj_size" if nm == "h" and layer.proj_size else "hidden"
                    raise ValueError(f"state[{k}] {nm} must have shape {want} "
                                     f"(directions, batch, {what}), got {a.shape}")
                parts.append(a.reshape(-1))
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)

    def unpack_state(self, vec, batch):
        """The flat state vector of the C core -> the per-layer structure (copies)."""
        out, off = [], 0
        for layer in self.layers:
            shape = (layer.num_directions, batch, layer.h_size)
            n = int(np.prod(shape))
            h = vec[off:off + n].reshape(shape).copy()
            off += n
            if layer.kind == "LSTM":
                shape = (layer.num_directions, batch, layer.hidden_size)  # c: hidden_size, also projected
                n = int(np.prod(shape))
                c = vec[off:off + n].reshape(shape).copy()
                off += n
                out.append((h, c))
            else:
                out.append(h)
        return out

    # --- whole sequences ---------------------------------------------------------------
    def _input(self, X, what="X"):
        X = float_array(X, what)
        if X.ndim == 2:
            raise ValueError(f"{what} must have 3 dimensions "
                             f"({'batch, T' if self.batch_first else 'T, batch'}, {self.input_size}), "
                             f"got shape {X.shape}; add a batch axis for a single sequence")
        if X.ndim != 3:
            raise ValueError(f"{what} must have 3 dimensions "
                             f"({'batch, T' if self.batch_first else 'T, batch'}, {self.input_size}), "
                             f"got shape {X.shape}")
        if X.shape[2] != self.input_size:
            raise ValueError(f"{what} has {X.shape[2]} features per step (shape {X.shape}), "
                             f"the model expects {self.input_size}")
        B, T = (X.shape[0], X.shape[1]) if self.batch_first else (X.shape[1], X.shape[0])
        return X, T, B

    def run(self, X, lengths=None, state=None):
        """Runs whole sequences.

        X : (T, batch, input_size), or (batch, T, input_size) when batch_first.
        lengths : optional (batch,) integers in [0, T]; outputs past a row's length are 0
            and its final state is the state at its last valid step.
        state : optional initial state (see module doc); the model's initial state if None.
        Returns (Y, final_state): Y is (T, batch, output_size) (or batch-first).
        """
        X, T, B = self._input(X)
        lens = _as_lengths(lengths, B, T)
        st = self.initial_state_vector(B) if state is None else self._pack_state(state, B)
        if self.threads > 1 and B >= 2 * self.threads and T:
            return self._run_split(X, T, B, lens, st)
        return self._run_one(X, T, B, lens, st)

    def _run_one(self, X, T, B, lens, st):
        Y = np.zeros(X.shape[:2] + (self.output_size,), np.float32)
        if T and B:
            H = self.layers[-1].h_size
            DH = self.output_size
            ys_t, ys_b = (DH, T * DH) if self.batch_first else (B * DH, DH)
            work = np.empty(self._stack.workspace_size(T, B), np.float32)
            self._stack.forward(X, lens, Y.reshape(-1), ys_t, ys_b, H, st, work, self.batch_first)
        return Y, self.unpack_state(st, B)

    def _run_split(self, X, T, B, lens, st):
        """run() with the batch rows split over self.threads threads. Rows are independent,
        so each thread takes its rows through the whole sequence with its own state and
        workspace: no synchronisation per step. Results equal a one-thread run to float32
        rounding (the input projection's BLAS call sees fewer rows)."""
        import concurrent.futures as cf
        if getattr(self, "_pool", None) is None or self._pool_size != self.threads:
            self._pool = cf.ThreadPoolExecutor(self.threads, thread_name_prefix="rnnengine")
            self._pool_size = self.threads
        bounds = np.linspace(0, B, self.threads + 1).astype(int)
        full = self.unpack_state(st, B)
        axis = 0 if self.batch_first else 1

        def rows(a, b0, b1):
            sl = [slice(None)] * a.ndim
            sl[axis] = slice(b0, b1)
            return np.ascontiguousarray(a[tuple(sl)])

        DH, H = self.output_size, self.layers[-1].h_size
        Y = np.zeros(X.shape[:2] + (DH,), np.float32)
        ys_t, ys_b = (DH, T * DH) if self.batch_first else (B * DH, DH)
        flat = Y.reshape(-1)
        states = [None] * (len(bounds) - 1)

        def part(k):
            # each thread writes its rows straight into Y (strided), with its own state
            b0, b1 = bounds[k], bounds[k + 1]
            sub = [tuple(x[:, b0:b1] for x in e) if isinstance(e, tuple) else e[:, b0:b1] for e in full]
            sv = self._pack_state(sub, b1 - b0)
            work = np.empty(self._stack.workspace_size(T, b1 - b0), np.float32)
            self._stack.forward(rows(X, b0, b1), None if lens is None else np.ascontiguousarray(lens[b0:b1]),
                                flat[b0 * ys_b:], ys_t, ys_b, H, sv, work, self.batch_first)
            states[k] = self.unpack_state(sv, b1 - b0)
        list(self._pool.map(part, range(len(bounds) - 1)))
        state = []
        for k, layer in enumerate(self.layers):
            if layer.kind == "LSTM":
                state.append(tuple(np.concatenate([r[k][i] for r in states], axis=1) for i in range(2)))
            else:
                state.append(np.concatenate([r[k] for r in states], axis=1))
        return Y, state

    def _run_onnx(self, X, sequence_lens, initial_h, initial_c):
        """One-layer ONNX operator semantics (used by LSTM/GRU/RNN.__call__)."""
        layer = self.layers[0]
        layout = 1 if self.batch_first else 0
        X, T, B = self._input(X)
        D, H, Hh = layer.num_directions, layer.hidden_size, layer.h_size  # Hh: h and Y (proj_size)
        lens = _as_lengths(sequence_lens, B, T, "sequence_lens")

        def initial(value, nm):
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
        state = [(h0, initial(initial_c, "initial_c"))] if layer.kind == "LSTM" else [h0]
        st = self._pack_state(state, B)
        Y = np.zeros((B, T, D, Hh) if layout else (T, D, B, Hh), np.float32)
        if T and B:
            if layout:
                ys_t, ys_b, ys_d = D * Hh, T * D * Hh, Hh
            else:
                ys_t, ys_b, ys_d = D * B * Hh, Hh, B * Hh
            work = np.empty(self._stack.workspace_size(T, B), np.float32)
            self._stack.forward(X, lens, Y.reshape(-1), ys_t, ys_b, ys_d, st, work, self.batch_first)
        final = self.unpack_state(st, B)[0]
        final = list(final) if layer.kind == "LSTM" else [final]
        for k, a in enumerate(final):
            if lens is not None:
                a[:, lens == 0, :] = 0.0  # onnxruntime: a row of length 0 has Y_h = Y_c = 0
            final[k] = np.ascontiguousarray(a.transpose(1, 0, 2)) if layout else a
        return (Y, *final)

    # --- streams -----------------------------------------------------------------------
    def stream(self, batch_size=1, state=None):
        """A :class:`rnnengine.Stream` of ``batch_size`` rows, starting from ``state``
        (default: the model's initial state). Needs every layer to run forward."""
        if not self.streamable:
            bad = [f"layer {k} is {layer.direction}" for k, layer in enumerate(self.layers)
                   if layer.direction != "forward"]
            raise ValueError("a stream feeds time steps in order, so every layer must have "
                             f"direction 'forward' ({'; '.join(bad)}); use Model.run() for whole sequences")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        # streams of one batch size share one read-only initial state (reset() copies it)
        cache = self.__dict__.setdefault("_stream_initial", {})
        init = cache.get(int(batch_size))
        if init is None:
            init = self.initial_state_vector(batch_size)
            init.flags.writeable = False
            cache[int(batch_size)] = init
        s = _core.Stream(self, self._stack, int(batch_size), init, self.batch_first)
        if state is not None:
            s.set_state(state)
        return s

    # Stream.get_state() / set_state(state) (rnnengine._core.Stream) use the structure of the
    # module doc: a list with one entry per layer, (h, c) for LSTM and h otherwise, each
    # (num_directions, batch_size, hidden_size); set_state checks it with _pack_state and
    # raises TypeError / ValueError naming the entry, before anything changes.


def load_onnx(path_or_model):
    """Loads an ONNX file whose graph is one LSTM/GRU/RNN node or a plain stack of them.
    (Real exported graphs with more glue go through the converter.)"""
    from rnnengine.frontend.onnx_import import load_stack
    return load_stack(path_or_model)
