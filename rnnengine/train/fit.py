"""train.py - training recurrent networks with the C core: backprop through time, optimisers,
checkpoints, and export to ONNX.

A :class:`Network` is an optional embedding, a stack of LSTM / GRU / RNN layers (each
forward, reverse or bidirectional, in ONNX layout and gate order) and a dense head. All
parameters live in one flat float32 array (so an optimiser step is one C call); each
tensor is a view into it. The C code (src_c/lstm.c, gru.c, rnn.c, train.c) does every loop
over time and every product; Python only walks the layers.

Tasks: ``"lm"`` (next-token language modelling: softmax cross-entropy at every step),
``"classify"`` (a label per sequence from the last step), ``"regress"`` (mean squared error
at every step, or of the last step with ``last_only=True``).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import onnx

from rnnengine import _core
from rnnengine.format import weightfile as fileformat
from rnnengine.codes import GATES
from rnnengine.train.export import network_to_onnx


# The most layers a stored network (a training checkpoint's train.config) may have: a few
# bytes of parameters per layer would otherwise make loading build a graph of any size.
MAX_STORED_LAYERS = 1000


class Network:
    """Parameters and forward/backward of embedding -> recurrent stack -> dense head.

    Parameters
    ----------
    kind : "LSTM", "GRU" or "RNN" (one kind per network, every layer).
    input_size : features per step, or the vocabulary size when ``embedding`` is set.
    hidden_size, num_layers, bidirectional : the stack.
    output_size : outputs of the dense head (classes, targets or the vocabulary).
    embedding : size of a token embedding in front (inputs are then int token ids).
    clip : ONNX ``clip`` of every layer; peepholes (LSTM); linear_before_reset (GRU);
    relu (RNN: Relu instead of Tanh).
    seed : initialisation (uniform in +-1/sqrt(H), as PyTorch does).
    forget_bias : LSTM only: the forget gate's bias starts at this value (Wb_f = forget_bias,
        Rb_f = 0) instead of random, e.g. 1.0 so the cells remember from the first step.
    threads : forward and backward split the batch rows over this many threads (an attribute
        that may be changed; not part of the model's config or its checkpoints). Gradients
        equal one thread's up to float32 rounding (the blocks' gradients are summed). With
        threads > 1, BLAS runs one thread per call during forward/backward when threadpoolctl
        is installed; otherwise set OPENBLAS_NUM_THREADS=1, or both would start threads.
    """

    def __init__(self, kind, input_size, hidden_size, output_size, num_layers=1, bidirectional=False,
                 embedding=None, clip=None, peepholes=False, linear_before_reset=0, relu=False, seed=0,
                 forget_bias=None, threads=1):
        if kind not in GATES:
            raise ValueError(f"kind must be LSTM, GRU or RNN, got {kind!r}")
        if peepholes and kind != "LSTM":
            raise ValueError("peepholes exist only for LSTM")
        if forget_bias is not None and kind != "LSTM":
            raise ValueError(f"forget_bias exists only for LSTM (a {kind} has no forget gate)")
        if forget_bias is not None and not math.isfinite(float(forget_bias)):
            raise ValueError(f"forget_bias must be a finite number, got {forget_bias}")
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size), ("output_size", output_size),
                        ("num_layers", num_layers)):
            if int(v) < 1:
                raise ValueError(f"{name} must be positive, got {v}")
        self.config = dict(kind=kind, input_size=int(input_size), hidden_size=int(hidden_size),
                           output_size=int(output_size), num_layers=int(num_layers),
                           bidirectional=bool(bidirectional), embedding=None if embedding is None else int(embedding),
                           clip=None if clip is None else float(clip), peepholes=bool(peepholes),
                           linear_before_reset=int(linear_before_reset), relu=bool(relu), seed=int(seed),
                           forget_bias=None if forget_bias is None else float(forget_bias))
        self.kind, self.H, self.L = kind, int(hidden_size), int(num_layers)
        self.threads = _check_threads(threads)
        self._tapes, self._grad_bufs = [], []
        self._scratch_bufs = {}  # _scratch(): internal buffers kept between passes
        self.D = 2 if bidirectional else 1
        self._layout()
        self.params = np.zeros(self.size, np.float32)
        self.grads = np.zeros(self.size, np.float32)
        rng = np.random.default_rng(seed)
        k = 1 / math.sqrt(self.H)
        for name, (off, shape) in self.slots.items():
            n = int(np.prod(shape))
            if name == "embedding":
                self.params[off:off + n] = rng.standard_normal(n) * 0.1
            elif name.endswith(".P"):
                self.params[off:off + n] = rng.uniform(-k, k, n) * 0.1
            else:
                self.params[off:off + n] = rng.uniform(-k, k, n)
        if forget_bias is not None:
            H = self.H
            for l in range(self.L):
                b = self.tensor(f"layer{l}.B")  # (D, 8H): Wb then Rb, gates i, o, f, c
                b[:, 2 * H:3 * H] = forget_bias
                b[:, 6 * H:7 * H] = 0.0

    @classmethod
    def from_config(cls, cfg, n_params):
        """The network a stored config (a checkpoint's ``train.config``, untrusted) describes,
        whose flat parameters hold n_params elements. The sizes are checked and the parameter
        count computed exactly (parameter_count) before anything is laid out or allocated, so
        a hostile config (a billion layers, a hidden size of 10^12) is refused at once with
        ValueError instead of looping or allocating."""
        if not isinstance(cfg, dict):
            raise ValueError(f"the config must be an object, got {type(cfg).__name__}")
        known = set(inspect.signature(cls.__init__).parameters) - {"self", "threads"}
        unknown = sorted(str(k) for k in cfg if k not in known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}")
        if cfg.get("kind") not in GATES:
            raise ValueError(f"kind must be one of {sorted(GATES)}, got {cfg.get('kind')!r}")
        missing = [k for k in ("input_size", "hidden_size", "output_size") if k not in cfg]
        if missing:
            raise ValueError(f"missing field(s) {missing}")
        for name in ("input_size", "hidden_size", "output_size", "num_layers", "embedding"):
            v = cfg.get(name, 1)
            if name == "embedding" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= max(n_params, 1):
                raise ValueError(f"{name} must be an integer from 1 to {max(n_params, 1)} (the parameters' "
                                 f"elements), got {v!r}")
        if cfg.get("num_layers", 1) > MAX_STORED_LAYERS:  # a few bytes per layer would build a huge graph
            raise ValueError(f"num_layers {cfg['num_layers']} is more than a stored network may have "
                             f"({MAX_STORED_LAYERS})")
        for name in ("clip", "forget_bias"):  # numbers that must be finite (clip also > 0)
            v = cfg.get(name)
            if v is None:
                continue
            try:
                f = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
            except OverflowError:  # an integer beyond any float (JSON allows 10**400)
                f = math.nan
            if not math.isfinite(f) or (name == "clip" and not f > 0):
                raise ValueError(f"{name} must be a finite number{' > 0' if name == 'clip' else ''}, got {v!r}")
        for name in ("bidirectional", "peepholes", "relu"):
            if not isinstance(cfg.get(name, False), bool):
                raise ValueError(f"{name} must be true or false, got {cfg[name]!r}")
        if cfg.get("linear_before_reset", 0) not in (0, 1) or isinstance(cfg.get("linear_before_reset", 0), float):
            raise ValueError(f"linear_before_reset must be 0 or 1, got {cfg['linear_before_reset']!r}")
        seed = cfg.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        need = cls.parameter_count(cfg)
        if need != n_params:
            raise ValueError(f"the config needs {need} parameters, the checkpoint holds {n_params}")
        return cls(**cfg)

    @staticmethod
    def parameter_count(cfg):
        """Elements of the flat parameter array of the network cfg describes (the layout of
        _layout, in closed form: exact Python integers, O(1) whatever the sizes)."""
        G, H = GATES[cfg["kind"]], int(cfg["hidden_size"])
        D = 2 if cfg.get("bidirectional") else 1
        E, I, O, L = cfg.get("embedding"), int(cfg["input_size"]), int(cfg["output_size"]), int(cfg.get("num_layers", 1))
        first = int(E) if E else I
        per_layer = D * G * H * H + D * 2 * G * H + (D * 3 * H if cfg.get("peepholes") else 0)
        return ((I * int(E)) if E else 0) + D * G * H * first + (L - 1) * D * G * H * D * H + L * per_layer \
            + O * D * H + O

    def _layout(self):
        c = self.config
        G, H, D = GATES[self.kind], self.H, self.D
        self.slots = {}
        off = 0

        def add(name, shape):
            nonlocal off
            self.slots[name] = (off, tuple(shape))
            off += int(np.prod(shape))
        if c["embedding"]:
            add("embedding", (c["input_size"], c["embedding"]))
        I = c["embedding"] or c["input_size"]
        for l in range(self.L):
            add(f"layer{l}.W", (D, G * H, I))
            add(f"layer{l}.R", (D, G * H, H))
            add(f"layer{l}.B", (D, 2 * G * H))
            if c["peepholes"]:
                add(f"layer{l}.P", (D, 3 * H))
            I = D * H
        add("head.W", (c["output_size"], D * H))
        add("head.b", (c["output_size"],))
        self.size = off

    def tensor(self, name, grads=False):
        """A parameter (or its gradient; grads may also be another flat array of the same
        layout) as a view into the flat array."""
        off, shape = self.slots[name]
        src = grads if isinstance(grads, np.ndarray) else (self.grads if grads else self.params)
        return src[off:off + int(np.prod(shape))].reshape(shape)

    def _spec(self, l, d, grads=False, projected=False):
        """The C cell of layer l, direction d (its gradients' views with grads); projected: its
        input is the caller's product with W (the embedding's tables, _embedding_product)."""
        c = self.config
        s = {"kind": self.kind, "H": self.H, "I": (c["embedding"] or c["input_size"]) if l == 0 else self.D * self.H,
             "clip": c["clip"], "linear_before_reset": c["linear_before_reset"], "relu": int(c["relu"]),
             "W": self.tensor(f"layer{l}.W", grads)[d], "R": self.tensor(f"layer{l}.R", grads)[d],
             "B": self.tensor(f"layer{l}.B", grads)[d],
             "P": self.tensor(f"layer{l}.P", grads)[d] if c["peepholes"] else None}
        if projected:
            s["x_projected"] = True
        return s

    def _checked_state(self, state, batch):
        """``state`` as forward() takes it (zero_state's structure), each array float32 of
        (D, batch, H); anything else is refused by name (a (1, B, 5) h for H = 4 ran before)."""
        want = (self.D, batch, self.H)
        if not isinstance(state, (list, tuple)) or len(state) != self.L:
            raise ValueError(f"state must be a list of {self.L} layer state(s) (zero_state's structure), got "
                             f"{type(state).__name__}{'' if not isinstance(state, (list, tuple)) else f' of {len(state)}'}")
        out = []
        for l, st in enumerate(state):
            parts = st if self.kind == "LSTM" else (st,)
            if self.kind == "LSTM" and (not isinstance(st, (list, tuple)) or len(st) != 2):
                raise ValueError(f"state[{l}] of an LSTM must be (h, c), each {want}")
            arrs = []
            for name, a in zip(("h", "c"), parts):
                a = np.asarray(a)
                if a.shape != want or a.dtype.kind != "f":
                    raise ValueError(f"state[{l}] {name} must be float {want} (directions, batch, hidden), "
                                     f"got {a.dtype} {a.shape}")
                arrs.append(np.ascontiguousarray(a, np.float32))
            out.append(tuple(arrs) if self.kind == "LSTM" else arrs[0])
        return out

    def zero_state(self, batch):
        """One (D, B, H) h per layer, and c for LSTM: [(h, c)] or [h]."""
        z = lambda: np.zeros((self.D, batch, self.H), np.float32)  # noqa: E731
        return [(z(), z()) if self.kind == "LSTM" else z() for _ in range(self.L)]

    # -- forward / backward over a batch of sequences (time-major)
    #
    # With threads > 1 the batch is split into that many contiguous row blocks (each
    # sequence's rows stay together: every layer, the head and the embedding treat rows
    # independently), each block runs forward and backward on its own Python thread while
    # the C calls release the GIL, and the blocks' parameter gradients are summed in block
    # order (so a run is deterministic for a given thread count). The loss is computed over
    # the whole batch, between forward and backward, as with one thread.
    def _blocks(self, B):
        k = max(1, min(int(self.threads), B))
        edges = [B * i // k for i in range(k + 1)]
        return [(edges[i], edges[i + 1]) for i in range(k)]

    def _scratch(self, key, shape):
        """An internal float32 buffer of this shape, kept between passes: the saved activations,
        work space, layer outputs and gradients of a training step are tens of MB, and fresh
        ones every step cost the kernel's page faults (~4% of a char LM step, measured). Only
        for arrays that stay inside the network (the tape backward() reads, never an array
        returned to the caller); key names one use (it includes the layer, direction and index
        of the block of rows, so no two live arrays share one, and the set stays bounded
        whatever the batch sizes: another shape replaces the buffer)."""
        a = self._scratch_bufs.get(key)
        if a is None or a.shape != shape:
            a = self._scratch_bufs[key] = np.empty(shape, np.float32)
        return a

    def forward(self, inputs, state=None):
        """inputs: (T, B, input_size) floats, or (T, B) token ids. Returns the head's outputs
        (T, B, output_size) and the final state; keeps what backward() needs."""
        c = self.config
        if c["embedding"]:
            raw = np.asarray(inputs)
            if raw.ndim != 2:
                raise ValueError(f"token inputs must be (T, batch), got shape {raw.shape}")
            # whole numbers inside the vocabulary (an id of 2**32 + 1 cast to int32 became 1)
            inputs = np.ascontiguousarray(check_ids(raw, "inputs", c["input_size"], "vocabulary"), dtype=np.int32)
        else:
            inputs = np.ascontiguousarray(inputs, dtype=np.float32)
            if inputs.ndim != 3 or inputs.shape[2] != c["input_size"]:
                raise ValueError(f"inputs must be (T, batch, {c['input_size']}), got shape {inputs.shape}")
        T, B = inputs.shape[:2]
        if T == 0 or B == 0:
            raise ValueError(f"inputs must have at least one time step and one row, got shape {inputs.shape}")
        state = self.zero_state(B) if state is None else self._checked_state(state, B)
        self._logits_shape = (T, B, c["output_size"])
        blocks = self._blocks(B)
        fold = self._folds_embedding(T * B)
        if len(blocks) == 1:
            logits, new_state, tape = self._forward_rows(inputs, state, 0, fold)
            self._tapes = [tape]
            return logits, new_state

        def rows(st, lo, hi):  # the state of rows lo:hi (axis 1 of each (D, B, H))
            return [tuple(np.ascontiguousarray(a[:, lo:hi]) for a in s) if isinstance(s, tuple)
                    else np.ascontiguousarray(s[:, lo:hi]) for s in st]
        with _blas_one_thread():
            parts = list(_pool(len(blocks)).map(lambda k: self._forward_rows(
                np.ascontiguousarray(inputs[:, blocks[k][0]:blocks[k][1]]), rows(state, *blocks[k]), k, fold),
                range(len(blocks))))
        self._tapes = [p[2] for p in parts]
        logits = np.concatenate([p[0] for p in parts], axis=1)
        new_state = []
        for l in range(self.L):
            per = [p[1][l] for p in parts]
            if self.kind == "LSTM":
                new_state.append(tuple(np.concatenate([q[i] for q in per], axis=1) for i in (0, 1)))
            else:
                new_state.append(np.concatenate(per, axis=1))
        return logits, new_state

    def _folds_embedding(self, tokens):
        """Whether a pass of this many tokens (T x batch) runs the embedding through the first
        layer's tables (_embedding_product): the product of the embedding rows with the first
        layer's W costs tokens x G*H x E multiply-adds each way (forward, dW, the embedding's
        gradient), the tables vocabulary x G*H x E, so they pay when the vocabulary is well
        below the tokens (char LM: 95 against 2,048; 4% of its step). Decided from the whole
        batch, so every thread count takes the same path."""
        return bool(self.config["embedding"]) and 2 * self.config["input_size"] <= tokens

    def _embedding_product(self, ids, d, block):
        """The first layer's input product for direction d, X_in @ W^T with X_in the embedding
        rows of ids (T, B), as rows of the table E @ W^T (vocabulary, G*H): the same sums
        regrouped (tests/test_train.py compares both paths)."""
        W, emb = self._spec(0, d)["W"], self.tensor("embedding")
        table = self._scratch(("table", d, block), (emb.shape[0], W.shape[0]))
        np.matmul(emb, W.T, out=table)
        xp = self._scratch(("xproj", d, block), ids.shape + (W.shape[0],))
        _core.embedding_forward(ids.reshape(-1), table, xp)
        return xp

    def _embedding_grads(self, ids, d, dxp, grads, block):
        """From the gradient of _embedding_product's rows (T, B, G*H): the table's gradient
        (each token's rows summed), then W's (dTable^T E) and the embedding's (dTable W)."""
        W, emb = self._spec(0, d)["W"], self.tensor("embedding")
        dtable = self._scratch(("dtable", d, block), (emb.shape[0], W.shape[0]))
        dtable[:] = 0
        _core.embedding_backward(ids.reshape(-1), dxp, dtable)
        # only the tokens that occur, as the embedding rows' products read them: an unused
        # row's zero gradient times a NaN or Inf in that embedding row (or in W) would be NaN
        used = np.unique(ids)
        self._spec(0, d, grads=grads)["W"][...] += dtable[used].T @ emb[used]
        self.tensor("embedding", grads)[used] += dtable[used] @ W

    def _forward_rows(self, inputs, state, block=0, fold=False):
        """forward() of one block of rows (``block``: its index, which keys its buffers):
        (logits, final state, tape for backward). fold: the embedding goes through the first
        layer's tables (layer 0 then takes the token ids themselves)."""
        c = self.config
        T, B = inputs.shape[:2]
        ids = inputs if c["embedding"] else None
        X = inputs
        if c["embedding"] and not fold:
            X = self._scratch(("emb", block), (T, B, c["embedding"]))
            _core.embedding_forward(ids.reshape(-1), self.tensor("embedding"), X)
        layers = []
        new_state = []
        for l in range(self.L):
            h0s, c0s = (state[l] if self.kind == "LSTM" else (state[l], None))
            out = self._scratch(("out", l, block), (T, B, self.D * self.H)) if self.D > 1 else None
            hN, cN = np.empty_like(h0s), (np.empty_like(c0s) if c0s is not None else None)
            dirs = []
            for d in range(self.D):
                spec = self._spec(l, d, projected=fold and l == 0)
                Xd = X if d == 0 else np.ascontiguousarray(X[::-1])
                if fold and l == 0:  # Xd: token ids; the cell takes their product with W
                    Xd = self._embedding_product(Xd, d, block)
                S, Wk = _core.train_sizes(spec, T, B)
                Y = self._scratch(("Y", l, d, block), (T, B, self.H))
                saved, work = self._scratch(("saved", l, d, block), (S,)), self._scratch(("work", block), (Wk,))
                h0 = np.ascontiguousarray(h0s[d])
                c0 = np.ascontiguousarray(c0s[d]) if c0s is not None else None
                _core.train_forward(spec, Xd, h0, c0, Y, hN[d], cN[d] if cN is not None else None, saved, work)
                if self.D == 1:
                    out = Y  # one direction: the layer's output is Y itself (no copy)
                else:
                    out[:, :, d * self.H:(d + 1) * self.H] = Y if d == 0 else Y[::-1]
                dirs.append((Xd, h0, c0, Y, saved))
            layers.append(dirs)
            new_state.append((hN, cN) if self.kind == "LSTM" else hN)
            X = out
        logits = np.empty((T, B, c["output_size"]), np.float32)
        _core.dense_forward(X.reshape(T * B, -1), self.tensor("head.W"), self.tensor("head.b"),
                            logits.reshape(T * B, -1))
        return logits, new_state, (ids, layers, X, fold)

    def backward(self, dlogits, input_grad=False):
        """Accumulates into self.grads the gradients of the loss whose derivative with
        respect to forward()'s outputs is dlogits (T, B, output_size). The final state of
        forward() is treated as a constant (truncated backprop through time). The gradient
        with respect to float inputs is computed only when input_grad is true (it is one more
        large product, which training does not need) and then returned, else None."""
        dlogits = np.ascontiguousarray(dlogits, np.float32)
        want = getattr(self, "_logits_shape", None)
        if want is None:
            raise ValueError("backward() must follow a forward()")
        if dlogits.shape != want:
            raise ValueError(f"dlogits must have the shape of forward()'s logits {want}, got {dlogits.shape}")
        blocks = self._blocks(dlogits.shape[1])
        if len(blocks) != len(self._tapes):
            raise ValueError("backward() must follow a forward() of the same batch")
        if len(blocks) == 1:
            return self._backward_rows(self._tapes[0], dlogits, self.grads, input_grad, 0)
        # block 0 accumulates into self.grads, the others into zeroed buffers summed after
        if len(self._grad_bufs) != len(blocks) - 1:
            self._grad_bufs = [np.empty_like(self.grads) for _ in blocks[1:]]
        for g in self._grad_bufs:
            g[:] = 0
        targets = [self.grads] + self._grad_bufs
        with _blas_one_thread():
            dXs = list(_pool(len(blocks)).map(
                lambda k: self._backward_rows(self._tapes[k],
                                              np.ascontiguousarray(dlogits[:, blocks[k][0]:blocks[k][1]]),
                                              targets[k], input_grad, k), range(len(blocks))))
        for g in self._grad_bufs:
            self.grads += g
        return np.concatenate(dXs, axis=1) if input_grad and not self.config["embedding"] else None

    def _backward_rows(self, tape, dlogits, grads, input_grad, block=0):
        """backward() of one block of rows (``block``: its index), accumulating into the flat
        array grads."""
        c = self.config
        ids, layers, top, fold = tape
        T, B = dlogits.shape[:2]
        dX = self._scratch(("dtop", block), top.shape)
        _core.dense_backward(top.reshape(T * B, -1), self.tensor("head.W"), dlogits.reshape(T * B, -1),
                             self.tensor("head.W", grads), self.tensor("head.b", grads), dX.reshape(T * B, -1))
        for l in reversed(range(self.L)):
            dY_all = dX
            dX = None
            # the input gradient of layer 0 feeds only the embedding (or the caller)
            need_dx = l > 0 or bool(c["embedding"]) or input_grad
            folded = fold and l == 0  # dXd: the gradient of the input product (_embedding_grads)
            for d, (Xd, h0, c0, Y, saved) in enumerate(layers[l]):
                spec, gspec = self._spec(l, d, projected=folded), self._spec(l, d, grads=grads)
                dY = (dY_all if self.D == 1 else
                      np.ascontiguousarray(dY_all[:, :, d * self.H:(d + 1) * self.H] if d == 0
                                           else dY_all[::-1, :, d * self.H:(d + 1) * self.H]))
                _, Wk = _core.train_sizes(spec, T, B)
                # (a returned input gradient is the caller's: a fresh array)
                dXd = None if not need_dx else (np.empty(Xd.shape, np.float32) if l == 0 and input_grad else
                                                self._scratch(("dX", l, d, block), Xd.shape))
                _core.train_backward(spec, Xd, h0, c0, Y, saved, dY, None, None, dXd, gspec["W"], gspec["R"],
                                     gspec["B"], gspec["P"], None, None, self._scratch(("work", block), (Wk,)))
                if folded:
                    self._embedding_grads(ids if d == 0 else np.ascontiguousarray(ids[::-1]), d, dXd, grads, block)
                elif need_dx:
                    dXd = dXd if d == 0 else dXd[::-1]
                    dX = dXd if dX is None else dX + dXd
        if fold:
            return None
        if c["embedding"]:
            _core.embedding_backward(ids.reshape(-1), np.ascontiguousarray(dX, np.float32),
                                     self.tensor("embedding", grads))
            return None
        return dX if input_grad else None

    # -- export and conversion back to the engine
    def to_onnx(self, path=None, state_io=False, opset=14):
        """The network as an ONNX model of standard ops (Gather, LSTM/GRU/RNN, Transpose,
        Reshape, MatMul, Add): input X (T, B, I) floats or ``tokens`` (T, B) int64, output
        ``logits`` (T, B, O). With state_io, each layer's initial state is an input
        (h0_l, c0_l: (D, B, H)) and its final state an output (hN_l, cN_l), so a stream
        can carry it. Returns the ModelProto (and writes it when path is given)."""
        model = network_to_onnx(self, state_io=state_io, opset=opset)
        if path is not None:
            onnx.save(model, path)
        return model


def _check_threads(threads):
    if isinstance(threads, bool) or int(threads) != threads or int(threads) < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    return int(threads)


_POOLS: dict = {}
_BLAS: list = []


def _blas_one_thread():
    """A context in which BLAS runs one thread per call (threadpoolctl, when installed), so the
    batch split's threads do not each start BLAS's own threads on the same cores; without
    threadpoolctl nothing changes (then set OPENBLAS_NUM_THREADS=1)."""
    if not _BLAS:
        try:
            from threadpoolctl import ThreadpoolController
            _BLAS.append(ThreadpoolController())
        except ImportError:
            _BLAS.append(None)
    return contextlib.nullcontext() if _BLAS[0] is None else _BLAS[0].limit(limits=1, user_api="blas")


def _pool(n):
    """A persistent pool of n worker threads (one per thread count, made on first use)."""
    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="rnnengine-train")
    return _POOLS[n]


class Adam:
    """Adam with decoupled weight decay (AdamW) over a flat parameter array, in C."""

    def __init__(self, size, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), betas, float(eps), float(weight_decay)
        self.m = np.zeros(size, np.float32)
        self.v = np.zeros(size, np.float32)
        self.t = 0

    def step(self, params, grads):
        self.t += 1
        _core.adam_step(params, grads, self.m, self.v, self.t, self.lr, self.betas[0], self.betas[1], self.eps,
                        self.weight_decay)

    def state(self):
        return {"m": self.m, "v": self.v}, {"t": self.t, "lr": self.lr, "betas": [float(b) for b in self.betas],
                                            "eps": self.eps, "weight_decay": self.weight_decay}


class SGD:
    """SGD with momentum (and L2 weight decay), in C."""

    def __init__(self, size, lr=0.1, momentum=0.9, weight_decay=0.0):
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.v = np.zeros(size, np.float32)
        self.t = 0

    def step(self, params, grads):
        self.t += 1
        _core.sgd_step(params, grads, self.v, self.lr, self.momentum, self.weight_decay)

    def state(self):
        return {"v": self.v}, {"t": self.t, "lr": self.lr, "momentum": self.momentum,
                               "weight_decay": self.weight_decay}


def loss_and_grad(task, logits, targets, last_only=False):
    """Loss value and d(loss)/d(logits) for a task (see module doc)."""
    T, B, O = logits.shape
    d = np.zeros_like(logits)
    if task in ("lm", "classify"):
        # classes 0..O-1, or -1 (ignored); a target of 2**32 + 2 cast to int32 became 2
        raw = np.asarray(targets)
        want = (T, B) if task == "lm" else (B,)
        if raw.size != int(np.prod(want)):
            raise ValueError(f"{task} targets must be {want} (one class per {'step and row' if task == 'lm' else 'row'}), "
                             f"got shape {raw.shape}")
        if raw.dtype.kind not in "iub" and not (raw.dtype.kind == "f" and np.all(raw == np.round(raw))):
            raise ValueError(f"targets must be whole class numbers, got {raw.dtype}")
        bad = (raw < -1) | (raw >= O)
        if bad.any():
            raise ValueError(f"target {raw.reshape(-1)[np.flatnonzero(bad.reshape(-1))[0]]} is outside 0..{O - 1} "
                             "(or -1 to ignore that step)")
    if task == "lm":
        tg = np.ascontiguousarray(targets, np.int32).reshape(-1)
        loss = _core.softmax_xent(logits.reshape(T * B, O), tg, d.reshape(T * B, O))
    elif task == "classify":
        tg = np.ascontiguousarray(targets, np.int32).reshape(-1)
        last = np.ascontiguousarray(logits[-1])
        dl = np.zeros_like(last)
        loss = _core.softmax_xent(last, tg, dl)
        d[-1] = dl
    elif task == "regress":
        if last_only:
            last = np.ascontiguousarray(logits[-1])
            dl = np.zeros_like(last)
            loss = _core.mse(last, np.ascontiguousarray(targets, np.float32).reshape(last.shape), dl)
            d[-1] = dl
        else:
            loss = _core.mse(logits.reshape(T * B, O), np.ascontiguousarray(targets, np.float32).reshape(T * B, O),
                             d.reshape(T * B, O))
    else:
        raise ValueError(f"task must be lm, classify or regress, got {task!r}")
    return float(loss), d


class Progress:
    """A one-line progress bar on stderr: step, loss, tokens/s, ETA."""

    def __init__(self, total, stream=sys.stderr, enabled=True):
        self.total, self.stream, self.enabled = total, stream, enabled
        self.t0 = time.perf_counter()
        self.tokens = 0

    def update(self, step, loss, tokens, extra=""):
        self.tokens += tokens
        if not self.enabled:
            return
        el = time.perf_counter() - self.t0
        rate = self.tokens / el if el > 0 else 0.0
        eta = (self.total - step) * el / max(step, 1)
        width = 24
        done = int(width * step / max(1, self.total))
        self.stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{self.total} loss {loss:.4f} "
                          f"{rate:,.0f} tok/s ETA {eta:5.0f}s {extra}   ")
        self.stream.flush()

    def close(self):
        if self.enabled:
            self.stream.write("\n")


TASKS = ("lm", "classify", "regress")
OPTIMIZERS = ("adam", "sgd")


def _first_bad(mask):
    """The first index (a tuple) where mask is True."""
    return tuple(int(i) for i in np.argwhere(mask)[0])


def check_finite(arr, what):
    """ValueError naming the array and the first NaN / Inf in it."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        at = _first_bad(~np.isfinite(arr))
        raise ValueError(f"{what} holds a non-finite value ({arr[at]}) at index {list(at)}; "
                         "training on it would give NaN weights")


def check_ids(arr, what, limit, name):
    """Integer ids in [0, limit): refuses float values that are not whole numbers, negative
    ids and ids >= limit, naming the array and the first bad index."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "f":
        check_finite(arr, what)
        if (arr != np.round(arr)).any():
            at = _first_bad(arr != np.round(arr))
            raise ValueError(f"{what} must be whole numbers; {what}{list(at)} = {arr[at]}")
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"{what} must be integers, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= limit)
    if bad.any():
        at = _first_bad(bad)
        raise ValueError(f"{what}{list(at)} = {arr[at]} is outside 0..{limit - 1} ({name} {limit})")
    return arr.astype(np.int64)


def check_data(net, task, inputs, targets, last_only=False, what="inputs"):
    """Validates (and returns, as arrays) the data of a task; see fit(). Returns
    (inputs, targets, last_only) where last_only is True for one regression target per
    sequence."""
    c = net.config
    tname = "targets" if what == "inputs" else what.replace("inputs", "targets")
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    X = np.asarray(inputs)
    if c["embedding"]:
        X = check_ids(X, what, c["input_size"], "vocabulary size")
    else:
        if X.dtype.kind not in "fiu":
            raise ValueError(f"{what} must be numbers, got dtype {X.dtype}")
        check_finite(X, what)
    if task == "lm":
        if not c["embedding"]:
            raise ValueError("task 'lm' needs a Network with an embedding (its inputs are token ids)")
        if net.D == 2:
            raise ValueError("a bidirectional network cannot be trained as a language model: its reverse "
                             "direction reads the tokens it is asked to predict")
        if targets is not None:
            raise ValueError("task 'lm' predicts the next token of inputs; pass targets=None")
        if last_only:
            raise ValueError("last_only applies to task 'regress'")
        X = X.reshape(-1)
        check_ids(X, what, c["output_size"], "output size")
        return X, None, False
    if targets is None:
        raise ValueError(f"task {task!r} needs targets")
    Y = np.asarray(targets)
    want_x = 2 if c["embedding"] else 3
    if X.ndim != want_x or (not c["embedding"] and X.shape[2] != c["input_size"]):
        shape = "(N, T) token ids" if c["embedding"] else f"(N, T, {c['input_size']})"
        raise ValueError(f"{what} must be {shape}, got shape {X.shape}")
    if len(Y) != len(X):
        raise ValueError(f"{len(X)} input sequences but {len(Y)} {tname}")
    if task == "classify":
        if last_only:
            raise ValueError("last_only applies to task 'regress' (classify always uses the last step)")
        if Y.ndim != 1:
            raise ValueError(f"classify {tname} must be one label per sequence, shape ({len(X)},), got {Y.shape}")
        return X, check_ids(Y, tname, c["output_size"], "classes"), False
    if Y.dtype.kind not in "fiu":
        raise ValueError(f"{tname} must be numbers, got dtype {Y.dtype}")
    check_finite(Y, tname)
    O = c["output_size"]
    if Y.ndim == 1 and O == 1:
        Y = Y[:, None]
    if Y.ndim == 2 and Y.shape[1] == O:          # one target per sequence: the last step
        return X, Y.astype(np.float32), True
    if Y.ndim == 3 and Y.shape[1:] == (X.shape[1], O):
        if last_only:
            raise ValueError(f"last_only=True takes one target per sequence, shape ({len(X)}, {O}); "
                             f"got {tname} of shape {Y.shape} (one per step)")
        return X, Y.astype(np.float32), False
    raise ValueError(f"regress {tname} must be ({len(X)}, {O}) (one per sequence) or "
                     f"({len(X)}, {X.shape[1]}, {O}) (one per step), got {Y.shape}")


def make_optimizer(name, size, lr=None, weight_decay=None, betas=None, eps=None, momentum=None):
    """An optimiser by name ("adam": Adam with decoupled weight decay; "sgd": SGD with momentum);
    None takes the default of each hyperparameter. Options the optimiser does not have are
    refused."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    wd = 0.0 if weight_decay is None else float(weight_decay)
    if name == "adam":
        if momentum is not None:
            raise ValueError("momentum is an option of optimizer 'sgd' (Adam has betas)")
        return Adam(size, 1e-3 if lr is None else lr, betas=(0.9, 0.999) if betas is None else tuple(betas),
                    eps=1e-8 if eps is None else eps, weight_decay=wd)
    if betas is not None or eps is not None:
        raise ValueError("betas and eps are options of optimizer 'adam'")
    return SGD(size, 1e-3 if lr is None else lr, momentum=0.9 if momentum is None else momentum, weight_decay=wd)


def _check_resume(opt, optimizer, lr, weight_decay, betas, eps, momentum):
    """On resume the checkpoint's optimiser continues; an option given that differs from it
    would silently train something else, so it is refused."""
    have = {"optimizer": type(opt).__name__.lower(), "lr": opt.lr, "weight_decay": opt.weight_decay,
            "betas": tuple(getattr(opt, "betas", ())) or None, "eps": getattr(opt, "eps", None),
            "momentum": getattr(opt, "momentum", None)}
    given = {"optimizer": optimizer, "lr": lr, "weight_decay": weight_decay,
             "betas": None if betas is None else tuple(float(b) for b in betas), "eps": eps, "momentum": momentum}
    for key, value in given.items():
        if value is not None and value != have[key]:
            raise ValueError(f"resuming a checkpoint trained with {key}={have[key]!r}, but {key}={value!r} "
                             f"was given; leave it out to continue with the checkpoint's value")


def fit(net, inputs, targets, task, steps, batch_size=None, seq_len=None, lr=None, optimizer=None,
        clip_norm=None, weight_decay=None, seed=0, val=None, val_every=0, progress=False, checkpoint=None,
        checkpoint_every=0, state=None, last_only=False, log=None, betas=None, eps=None, momentum=None,
        extra=None, threads=None):
    """Trains ``net`` for ``steps`` optimiser steps; deterministic given ``seed``.

    inputs / targets:
      * lm: one long token sequence ``inputs`` (int array); targets None (next tokens).
        Batches are ``batch_size`` parallel streams through the sequence, ``seq_len`` steps
        per optimiser step, the recurrent state carried from chunk to chunk (truncated
        BPTT). The network must be unidirectional.
      * classify: inputs (N, T, I) (or (N, T) token ids) and (N,) integer labels in
        0..output_size-1; the last step is classified. Random minibatches of ``batch_size``.
      * regress: inputs as classify; targets (N, T, O), one per step, or (N, O), one per
        sequence (the last step; also what ``last_only=True`` asks for).
    Non-finite inputs or targets, labels out of range and unknown options are refused with
    a ValueError; a non-finite loss or gradient stops training with a FloatingPointError
    naming the step.
    optimizer: "adam" (default; betas (0.9, 0.999), eps 1e-8, weight_decay decoupled) or "sgd"
    (momentum 0.9, weight_decay as L2); lr 1e-3 and weight_decay 0 unless given. batch_size
    (default 16), seq_len (lm: default 64) and clip_norm (default 1.0; 0: off) are kept in the
    checkpoint: a resume takes them from it, and refuses other values given.
    val: (inputs, targets) evaluated every ``val_every`` steps (loss in the log).
    checkpoint: a path written every ``checkpoint_every`` steps and at the end. Resume with
    ``state`` from :func:`load_checkpoint`: the optimiser (with every hyperparameter), the
    minibatch random generator and the language model's position and carried state continue,
    so the resumed run equals an uninterrupted one bit for bit. extra: a JSON-able dict stored
    in the checkpoint (e.g. the vocabulary). threads: split each batch's rows over this many
    threads (sets ``net.threads``; None keeps it; see :class:`Network`). Returns the list of
    (step, train loss, val loss or None).
    """
    if threads is not None:
        net.threads = _check_threads(threads)
    X_all, Y_all, last_only = check_data(net, task, inputs, targets, last_only)
    if val is not None:
        val = check_data(net, task, val[0], val[1] if len(val) > 1 else None, last_only, what="val inputs")[:2]
    options = {"batch_size": batch_size, "seq_len": seq_len, "clip_norm": clip_norm}
    if state:
        for key, stored in (state.get("options") or {}).items():
            if key in options and stored is not None:
                if options[key] is not None and options[key] != stored:
                    raise ValueError(f"resuming a checkpoint trained with {key}={stored!r}, but {key}={options[key]!r} "
                                     "was given; leave it out to continue with the checkpoint's value")
                options[key] = stored
    defaults = {"batch_size": 16, "seq_len": 64 if task == "lm" else None, "clip_norm": 1.0}
    options = {k: defaults[k] if v is None else v for k, v in options.items()}
    batch_size, seq_len, clip_norm = options["batch_size"], options["seq_len"], options["clip_norm"]
    if int(batch_size) < 1 or int(steps) < 0:
        raise ValueError(f"batch_size must be positive and steps non-negative, got {batch_size}, {steps}")
    rng = np.random.default_rng(seed)
    if state:
        opt = state["optimizer"]
        _check_resume(opt, optimizer, lr, weight_decay, betas, eps, momentum)
        if state.get("task") not in (None, task):
            raise ValueError(f"the checkpoint was trained on task {state['task']!r}, not {task!r}")
        if state.get("rng") is not None:
            rng.bit_generator.state = state["rng"]
    else:
        opt = make_optimizer("adam" if optimizer is None else optimizer, net.size, lr, weight_decay, betas, eps,
                             momentum)
    start = opt.t
    history = []
    bar = Progress(start + steps, enabled=progress)
    carry = None
    pos = 0
    if task == "lm":
        seq = X_all
        span = (len(seq) - 1) // batch_size
        if span < seq_len + 1:
            raise ValueError(f"the text is too short for {batch_size} streams of {seq_len} steps")
        offsets = np.arange(batch_size) * span
        pos = state.get("pos", 0) if state else 0
        carry = state.get("carry") if state else None
    for step in range(start + 1, start + steps + 1):
        if task == "lm":
            if pos + seq_len >= span:
                pos, carry = 0, None
            idx = offsets[None, :] + pos + np.arange(seq_len)[:, None]   # (T, B)
            xb, yb = seq[idx], seq[idx + 1]
            pos += seq_len
        else:
            pick = rng.integers(0, len(X_all), batch_size)
            xb = np.swapaxes(X_all[pick], 0, 1)                          # (T, B, ...)
            yb = Y_all[pick]
            if task == "regress" and not last_only:
                yb = np.swapaxes(yb, 0, 1)
            carry = None
        net.grads[:] = 0
        logits, carry = net.forward(xb, carry)
        loss, dlogits = loss_and_grad(task, logits, yb, last_only)
        if not math.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss} at step {step}; the weights are "
                                     f"left as after step {step - 1} (try a lower lr or clip_norm)")
        net.backward(dlogits)
        norm = _core.clip_grad_norm(net.grads, float(clip_norm) if clip_norm else 0.0)
        if not math.isfinite(norm):
            raise FloatingPointError(f"the gradient became non-finite (norm {norm}) at step {step}; the "
                                     f"weights are left as after step {step - 1}")
        opt.step(net.params, net.grads)
        vloss = None
        if val is not None and val_every and step % val_every == 0:
            vloss = evaluate(net, task, *val, last_only=last_only)
        history.append((step, loss, vloss))
        if log is not None:
            log(step, loss, vloss)
        bar.update(step, loss, xb.size, "" if vloss is None else f"val {vloss:.4f}")
        if checkpoint and checkpoint_every and step % checkpoint_every == 0:
            save_checkpoint(checkpoint, net, opt, pos=pos, extra=extra, carry=carry, rng=rng, task=task,
                            options=options)
    bar.close()
    if checkpoint:
        save_checkpoint(checkpoint, net, opt, pos=pos, extra=extra, carry=carry, rng=rng, task=task, options=options)
    return history


def evaluate(net, task, inputs, targets=None, last_only=False, seq_len=256):
    """Mean loss over a validation set (lm: one token sequence, run in chunks)."""
    if task == "lm":
        seq = np.asarray(inputs).reshape(-1)
        total, count, state = 0.0, 0, None
        for s in range(0, len(seq) - 1, seq_len):
            x = seq[s:min(len(seq) - 1, s + seq_len)]
            y = seq[s + 1:s + 1 + len(x)]
            logits, state = net.forward(x[:, None], state)
            loss, _ = loss_and_grad("lm", logits, y[:, None])
            total += loss * len(x)
            count += len(x)
        return total / max(1, count)
    inputs, targets, last_only = check_data(net, task, inputs, targets, last_only)
    X = np.swapaxes(inputs, 0, 1)
    Y = targets
    if task == "regress" and not last_only:
        Y = np.swapaxes(Y, 0, 1)
    logits, _ = net.forward(X)
    return loss_and_grad(task, logits, Y, last_only)[0]


# --- checkpoints: the weight file (rnnengine.format.weightfile) ------------------------------------

def save_checkpoint(path, net, opt, pos=0, extra=None, carry=None, rng=None, task=None, options=None):
    """Parameters, optimiser state (every hyperparameter), the minibatch generator's state,
    the position in the text and the carried recurrent state (language modelling) in one
    weight file (float32), so a resumed run continues exactly."""
    tensors = {"params": net.params}
    for l, st in enumerate(carry or []):
        for name, arr in zip(("h", "c"), st if isinstance(st, tuple) else (st,)):
            tensors[f"carry.{l}.{name}"] = arr
    arrays, scalars = opt.state()
    tensors.update({f"optimizer.{k}": v for k, v in arrays.items()})
    meta = {"train.config": net.config, "train.optimizer": type(opt).__name__, "train.optimizer_state": scalars,
            "train.pos": int(pos), "train.extra": extra or {}, "train.task": task,
            # batch_size, seq_len, clip_norm: a resume given others would silently train another run
            "train.options": dict(options or {}),
            # the generator's state holds 128-bit integers: kept as decimal strings in JSON
            "train.rng": None if rng is None else _rng_to_json(rng.bit_generator.state)}
    fileformat.write(path, {"kind": "rnnengine-checkpoint"}, tensors, quantize=set(), metadata=meta)


def load_checkpoint(path):
    """(network, state) where state = {"optimizer": ..., "pos": ...} resumes fit()."""
    with fileformat.read(path) as wf:
        if wf.graph.get("kind") != "rnnengine-checkpoint":
            raise ValueError(f"{path} is a weight file but not a training checkpoint")
        net = Network.from_config(wf.metadata["train.config"], wf.tensor("params").size)
        net.params[:] = wf.tensor("params")
        sc = wf.metadata["train.optimizer_state"]
        if wf.metadata["train.optimizer"] == "Adam":
            opt = Adam(net.size, sc["lr"], betas=tuple(sc.get("betas", (0.9, 0.999))), eps=sc.get("eps", 1e-8),
                       weight_decay=sc.get("weight_decay", 0.0))
            opt.m[:], opt.v[:] = wf.tensor("optimizer.m"), wf.tensor("optimizer.v")
        else:
            opt = SGD(net.size, sc["lr"], momentum=sc.get("momentum", 0.9), weight_decay=sc.get("weight_decay", 0.0))
            opt.v[:] = wf.tensor("optimizer.v")
        opt.t = sc["t"]
        carry = None
        if "carry.0.h" in wf.names:
            carry = []
            for l in range(net.L):
                h = np.array(wf.tensor(f"carry.{l}.h"))
                carry.append((h, np.array(wf.tensor(f"carry.{l}.c"))) if net.kind == "LSTM" else h)
        rng = wf.metadata.get("train.rng")
        return net, {"optimizer": opt, "pos": wf.metadata.get("train.pos", 0), "carry": carry,
                     "extra": wf.metadata.get("train.extra", {}), "task": wf.metadata.get("train.task"),
                     "options": wf.metadata.get("train.options") or {},
                     "rng": None if rng is None else _rng_from_json(rng)}


def _rng_to_json(st):
    return json.loads(json.dumps(st, default=str), parse_int=str)


def _rng_from_json(st):
    return json.loads(json.dumps(st), object_hook=lambda d: {k: (int(v) if isinstance(v, str) and v.isdigit() else v)
                                                            for k, v in d.items()})


def char_vocab(text):
    """The sorted characters of a text, and the text as int32 token ids."""
    vocab = "".join(sorted(set(text)))
    index = {ch: k for k, ch in enumerate(vocab)}
    return vocab, np.fromiter((index[ch] for ch in text), dtype=np.int32, count=len(text))


def export_char_lm(net, vocab, path, notes=""):
    """A character language model as ONNX with its state as graph inputs/outputs and its
    vocabulary in the model's metadata (key "rnnengine.vocab", a JSON string)."""
    model = net.to_onnx(state_io=True)
    for key, value in (("rnnengine.vocab", json.dumps(vocab)), ("rnnengine.notes", notes)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, path)
    return model
