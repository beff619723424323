"""The layer-stack runtime: a Model that is a stack of recurrent layers, run by the C stack
directly (no graph executor between the caller and the cells), with streams of the C core.

State: :class:`rnnengine.State`, as for every model: ``{"layers": {"layer0": ..., "layer1":
...}, "inputs": {}, "context": {}}``, an LSTM layer's entry ``(h, c)``, a GRU or RNN layer's
``h`` (as PyTorch's nn.LSTM / nn.GRU per layer); each array has shape (num_directions, batch,
hidden_size) (h of a projected LSTM layer: proj_size instead).
"""
from __future__ import annotations

from typing import Any, cast

import numpy as np

from rnnengine import _core
from rnnengine.errors import NotStreamableError
from rnnengine.runtime.base import Model, Stream
from rnnengine.runtime.layers import _Layer, as_lengths, layer_key, pack_state, sequence_input, unpack_state


def _check_compact_weights(cell: dict[str, Any], weight_dtype: str, where: str, direction: int) -> None:
    """Refuses weights the compact storage cannot hold exactly enough to stay honest: float16
    turns finite values above 65504 into Inf, int8 has no code for +-Inf (NaN is kept: its
    output column is NaN, as in float32)."""
    for name in ("W", "R", "Whr"):
        w = cell.get(name)
        if w is None or not np.size(w):
            continue
        # First the extremes, which NumPy reduces without a temporary array (fmax/fmin skip
        # NaN): no weight-sized scratch at load, which glibc could keep in the heap of every
        # process serving the model (load(shared=True)). Only a suspect matrix is searched.
        hi, lo = np.fmax.reduce(w, axis=None), np.fmin.reduce(w, axis=None)
        if (-65504.0 <= lo and hi <= 65504.0) if weight_dtype == "float16" else not (np.isinf(hi) or np.isinf(lo)):
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


class LayerModel(Model):
    """A :class:`rnnengine.Model` that is a stack of recurrent layers run by the C core;
    ``rnnengine.Model(layers, ...)`` builds one.

    Inputs and outputs: the input ``X`` (``lengths`` as a keyword or a dict entry), the
    outputs ``Y`` (the top layer's output sequence) and ``state`` (the final state, in the
    structure of the module doc), so ``Y, state = model.run(X)``.

    Parameters
    ----------
    layers : list of LSTM / GRU / RNN layers; layer k+1's input_size must equal
        layer k's output_size (num_directions * hidden_size).
    batch_first : arrays are (batch, T, features) instead of (T, batch, features).
    initial_state : optional default state (see module doc) with batch size 1,
        broadcast to every row; zeros when omitted. Streams start from it and
        reset() returns to it.
    weight_dtype : "float32" (default), "float16" or "int8": how the packed recurrent weights
        are stored, for streaming steps and whole sequences alike. float16 / int8 read 2x / 4x
        fewer bytes per step (faster for large hidden sizes, where a step is bound by memory:
        batch 1 and small batches) at an accuracy cost. run() reads the same compact R and W
        as the same steps streamed and gives their bits, at every batch size; only on CPUs
        without AVX2 (the portable kernels), the input projection of 128 rows or more is
        float32 BLAS over the float32 W (src_c/internal.h, RNN_BLAS_MIN_ROWS), and the
        result differs from the streamed steps by W's rounding.
    threads : how many threads a call may use; 1 by default. run() on a batch of at least
        2 * threads rows splits the rows (each thread runs its rows through the whole
        sequence, so no synchronisation per step); smaller batches (batch 1), and every
        stream step, split each step's products by gate rows instead (src_c/pool.c: a
        persistent pool that sleeps when idle, bit-identical to one thread, used only for
        products large enough to gain). At most rnnengine._core.threads_limit() threads
        run (RNNENGINE_NUM_THREADS / OMP_NUM_THREADS, capped by the CPUs).
    """

    def __init__(self, layers: Any, batch_first: bool = False, initial_state: Any = None,
                 weight_dtype: str = "float32", threads: int = 1) -> None:
        layers = list(layers)
        if not layers:
            raise ValueError("a Model needs at least one layer")
        for k, layer in enumerate(layers):
            if not isinstance(layer, _Layer):
                raise TypeError(f"layers[{k}] is a {type(layer).__name__}, not an LSTM/GRU/RNN layer")
            if getattr(layer, "layout", 0) and not batch_first:
                # a stack reads (T, batch, I), or (batch, T, I) with batch_first=True, whatever its
                # layers' own layout (from_torch gives a batch_first module's layers layout=1 and the
                # Model batch_first=True); a layout=1 layer in a time-major Model was read time-major
                # (0.18 off, no error)
                raise ValueError(f"layers[{k}] has layout=1 (batch first), but the Model reads (T, batch, "
                                 "features): give Model(layers, batch_first=True) for (batch, T, features) input")
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
            self._default = pack_state(self.layers, initial_state, 1)

    def __repr__(self) -> str:
        inner = ", ".join(repr(layer) for layer in self.layers)
        return f"Model([{inner}], batch_first={self.batch_first})"

    outputs = ["Y", "state"]

    @property
    def input_names(self) -> list[str]:
        return ["X"]

    @property
    def streamable(self) -> bool:
        """True when every layer runs forward in time (so it can be fed step by step)."""
        return all(layer.direction == "forward" for layer in self.layers)

    # --- state <-> the C core's flat vector ------------------------------------------
    def _pack_state(self, state: Any, batch: int, broadcast: bool = False) -> np.ndarray:
        """The structured state -> the C core's flat vector (layers.pack_state)."""
        return pack_state(self.layers, state, batch, broadcast)

    def unpack_state(self, vec: np.ndarray, batch: int) -> dict[str, Any]:
        """The C core's flat state vector -> the structured state (copies)."""
        return unpack_state(self.layers, vec, batch)

    def initial_state_vector(self, batch: int) -> np.ndarray:
        if self._default is None:
            return np.zeros(self._stack.state_size(batch), np.float32)
        return pack_state(self.layers, unpack_state(self.layers, self._default, 1), batch, broadcast=True)

    # --- whole sequences ---------------------------------------------------------------
    def run(self, X: Any, lengths: Any = None, state: Any = None) -> Any:
        """Runs whole sequences.

        X : an array, or a dict {"X": array, "lengths": array (optional)}, which gives a
            dict {"Y": Y, "state": final_state} back.
        X : (T, batch, input_size), or (batch, T, input_size) when batch_first.
        lengths : optional (batch,) integers in [0, T]; outputs past a row's length are 0
            and its final state is the state at its last valid step.
        state : optional initial state (see module doc); the model's initial state if None.
        Returns (Y, final_state): Y is (T, batch, output_size) (or batch-first).
        """
        if isinstance(X, dict):
            unknown = sorted(map(str, set(X) - {"X", "lengths"}))
            if unknown or "X" not in X:
                raise ValueError(f"a layer-stack model takes the inputs 'X' and (optionally) 'lengths', got "
                                 f"{sorted(map(str, X))}")
            if "lengths" in X and lengths is not None:
                raise ValueError("lengths given twice: in the dict and as a keyword")
            Y, final = self.run(X["X"], X.get("lengths", lengths), state)
            return {"Y": Y, "state": final}
        X, T, B = sequence_input(X, self.input_size, self.batch_first)
        lens = as_lengths(lengths, B, T)
        st = self.initial_state_vector(B) if state is None else pack_state(self.layers, state, B)
        if self.threads > 1 and B >= 2 * self.threads and T:
            return self._run_split(X, T, B, lens, st)
        return self._run_one(X, T, B, lens, st)

    def _run_one(self, X: np.ndarray, T: int, B: int, lens: np.ndarray | None,
                 st: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        Y = np.zeros(X.shape[:2] + (self.output_size,), np.float32)
        if T and B:
            H = self.layers[-1].h_size
            DH = self.output_size
            ys_t, ys_b = (DH, T * DH) if self.batch_first else (B * DH, DH)
            work = np.empty(self._stack.workspace_size(T, B), np.float32)
            self._stack.forward(X, lens, Y.reshape(-1), ys_t, ys_b, H, st, work, self.batch_first, self.threads)
        return Y, unpack_state(self.layers, st, B)

    def _run_split(self, X: np.ndarray, T: int, B: int, lens: np.ndarray | None,
                   st: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """run() with the batch rows split over self.threads threads. Rows are independent,
        so each thread takes its rows through the whole sequence with its own state and
        workspace: no synchronisation per step. Results equal a one-thread run to float32
        rounding (the input projection's BLAS call sees fewer rows)."""
        import concurrent.futures as cf  # here: its import (with logging's) was 4 ms of every load()
        pool: cf.ThreadPoolExecutor | None = self.__dict__.get("_pool")
        if pool is None or self.__dict__.get("_pool_size") != self.threads:
            pool = self._pool = cf.ThreadPoolExecutor(self.threads, thread_name_prefix="rnnengine")
            self._pool_size = self.threads
        bounds = np.linspace(0, B, self.threads + 1).astype(int)
        full = unpack_state(self.layers, st, B)["layers"]
        axis = 0 if self.batch_first else 1

        def rows(a: np.ndarray, b0: int, b1: int) -> np.ndarray:
            sl = [slice(None)] * a.ndim
            sl[axis] = slice(b0, b1)
            return np.ascontiguousarray(a[tuple(sl)])

        DH, H = self.output_size, self.layers[-1].h_size
        Y = np.zeros(X.shape[:2] + (DH,), np.float32)
        ys_t, ys_b = (DH, T * DH) if self.batch_first else (B * DH, DH)
        flat = Y.reshape(-1)
        states: list[dict[str, Any]] = [{} for _ in range(len(bounds) - 1)]

        def part(k: int) -> None:
            # each thread writes its rows straight into Y (strided), with its own state
            b0, b1 = bounds[k], bounds[k + 1]
            sub = {k: tuple(x[:, b0:b1] for x in e) if isinstance(e, tuple) else e[:, b0:b1] for k, e in full.items()}
            sv = pack_state(self.layers, {"layers": sub}, b1 - b0)
            work = np.empty(self._stack.workspace_size(T, b1 - b0), np.float32)
            self._stack.forward(rows(X, b0, b1), None if lens is None else np.ascontiguousarray(lens[b0:b1]),
                                flat[b0 * ys_b:], ys_t, ys_b, H, sv, work, self.batch_first)
            states[k] = unpack_state(self.layers, sv, b1 - b0)["layers"]
        list(pool.map(part, range(len(bounds) - 1)))
        layers: dict[str, Any] = {}
        for k, layer in enumerate(self.layers):
            key = layer_key(k)
            if layer.kind == "LSTM":
                layers[key] = tuple(np.concatenate([r[key][i] for r in states], axis=1) for i in range(2))
            else:
                layers[key] = np.concatenate([r[key] for r in states], axis=1)
        return Y, {"layers": layers, "inputs": {}, "context": {}}

    # --- streams -----------------------------------------------------------------------
    def stream(self, batch_size: int | None = 1, state: Any = None) -> Stream:
        """A :class:`rnnengine.Stream` of ``batch_size`` rows, starting from ``state``
        (default: the model's initial state). Needs every layer to run forward."""
        if batch_size is None:
            batch_size = 1
        if not self.streamable:
            bad = [f"layer {k} is {layer.direction}" for k, layer in enumerate(self.layers)
                   if layer.direction != "forward"]
            raise NotStreamableError("this layer stack", "a stream feeds time steps in order, so every layer "
                                     f"must have direction 'forward' ({'; '.join(bad)}); use run() for whole "
                                     "sequences")
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
        return cast(Stream, s)  # a registered virtual subclass of rnnengine.Stream

    # Stream.get_state() / set_state(state) (rnnengine._core.Stream) use rnnengine.State (module
    # doc); set_state checks it with layers.pack_state and raises TypeError / ValueError naming
    # the entry, before anything changes.


Model._layer_type = LayerModel
Stream.register(_core.Stream)
