"""PyTorch recurrent modules (nn.LSTM / nn.GRU / nn.RNN, also with proj_size) as rnnengine Models.

    model = rnnengine.from_torch(lstm)              # a live nn.LSTM, eval-mode semantics
    Y, state = model.run(X)                         # X laid out as the module takes it
    h_n, c_n = model.to_torch_state(state)          # PyTorch's (h_n, c_n) shapes

PyTorch stacks the gate blocks of its weights in another order than ONNX (and rnnengine):
LSTM i, f, g, o against ONNX i, o, f, c (g is ONNX's c); GRU r, z, n against ONNX z, r, h.
Every conversion between the two goes through :func:`gate_permutation`. torch itself is not
a dependency: modules are read duck-typed (their ``mode`` and ``weight_ih_l0``-style
parameters), and torch is imported only to recognise containers.
"""
from __future__ import annotations

import warnings

from typing import Any, Mapping

import numpy as np

from rnnengine.codes import GATES
from rnnengine.runtime.layers import GRU, LSTM, RNN, _Layer, layer_key, unpack_state
from rnnengine.runtime.model import LayerModel

# Gate blocks, top to bottom, of the stacked weight matrices in each convention. The letters
# name the same gates across conventions: LSTM i(nput), f(orget), c(ell candidate; PyTorch's g),
# o(utput); GRU z (update), r (reset), h (candidate; PyTorch's n).
GATE_ORDERS = {
    "LSTM": {"onnx": "iofc", "torch": "ifco"},
    "GRU": {"onnx": "zrh", "torch": "rzh"},
    "RNN": {"onnx": "h", "torch": "h"},
}


def gate_permutation(kind: str, hidden_size: int, source: str = "torch", target: str = "onnx") -> np.ndarray:
    """Row indices ``idx`` (int64, length gates * hidden_size) that reorder stacked gate blocks
    from the ``source`` convention to the ``target`` one: ``W_target = W_source[idx]`` for a
    weight (G*H, K) or a bias (G*H,) of one direction.

    ``kind`` is "LSTM", "GRU" or "RNN"; conventions are "torch" and "onnx" (GATE_ORDERS).
    The permutation from b to a is the inverse of the one from a to b:
    ``gate_permutation(k, H, a, b)[gate_permutation(k, H, b, a)] == arange(G * H)``.
    """
    if kind not in GATE_ORDERS:
        raise ValueError(f"gate_permutation: kind must be one of {sorted(GATE_ORDERS)}, got {kind!r}")
    orders = GATE_ORDERS[kind]
    for which, conv in (("source", source), ("target", target)):
        if conv not in orders:
            raise ValueError(f"gate_permutation: {which} must be one of {sorted(orders)}, got {conv!r}")
    H = int(hidden_size)
    if H <= 0:
        raise ValueError(f"gate_permutation: hidden_size must be positive, got {hidden_size}")
    src, dst = orders[source], orders[target]
    blocks = [src.index(g) for g in dst]  # target block k is source block blocks[k]
    return np.concatenate([np.arange(b * H, (b + 1) * H) for b in blocks]).astype(np.int64)


def _numpy(t: Any, what: str) -> np.ndarray:
    """A parameter or tensor (torch, or anything array-like) as float32 NumPy; torch tensors
    other than float32 are refused rather than silently rounded or widened."""
    dtype = getattr(t, "dtype", None)
    if hasattr(t, "detach"):
        if str(dtype) != "torch.float32":
            raise TypeError(f"from_torch: {what} is {dtype}; rnnengine computes in float32, so convert "
                            f"the module first (module.float())")
        t = t.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(t), dtype=np.float32)


_KINDS = {"LSTM": "LSTM", "GRU": "GRU", "RNN_TANH": "RNN", "RNN_RELU": "RNN"}


def _describe(module: Any) -> str:
    """nn.Linear for torch's own classes, else module.Class."""
    cls = type(module)
    return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn.") else f"{cls.__module__}.{cls.__name__}"


def _check_plain_forward(module: Any, where: str, kind: str) -> None:
    """Refuses a module whose forward is not torch's own: a subclass that overrides forward(),
    or forward hooks (which may change the output or, like the old spectral_norm, the weights
    before each call). rnnengine computes the plain nn.LSTM / GRU / RNN forward."""
    try:
        import torch.nn as nn
    except ImportError:  # duck-typed modules without torch: nothing to compare with
        return
    base = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}[kind]
    if isinstance(module, base) and type(module).forward is not base.forward:  # type: ignore[attr-defined]
        raise TypeError(f"from_torch: {where} ({_describe(module)}) overrides forward() of nn.{kind}; "
                        f"rnnengine computes nn.{kind}'s own forward, so it cannot stand in for this module")
    hooks = [h for h in ("_forward_hooks", "_forward_pre_hooks") if getattr(module, h, None)]
    if hooks:
        raise TypeError(f"from_torch: {where} ({_describe(module)}) has forward hooks ({', '.join(hooks)}) "
                        f"that rnnengine would not run; remove them first")


def _recurrent_layers(module: Any, where: str) -> tuple[list[_Layer], tuple[str, int, int], bool]:
    """The rnnengine layers of one nn.LSTM / nn.GRU / nn.RNN, its (num_layers, D, kind) and
    batch_first."""
    mode = getattr(module, "mode", None)
    kind = _KINDS.get(mode) if isinstance(mode, str) else None
    if kind is None or not hasattr(module, "num_layers"):
        name = type(module).__name__
        hint = ""
        if name.endswith("Cell"):
            hint = (f" ({name} is a single step whose state the caller carries: copy its weights into a "
                    f"one-layer nn.{name[:-4]})")
        raise TypeError(f"from_torch: {where} ({_describe(module)}) is not an nn.LSTM / nn.GRU / nn.RNN "
                        f"(or an nn.Sequential / nn.ModuleList of them){hint}; from_torch converts recurrent "
                        f"layers only: export a whole model with torch.onnx and use rnnengine.convert")
    _check_plain_forward(module, where, kind)
    L = int(module.num_layers)
    batch_first = bool(getattr(module, "batch_first", False))
    D = 2 if getattr(module, "bidirectional", False) else 1
    bias = bool(getattr(module, "bias", True))
    proj = int(getattr(module, "proj_size", 0) or 0)
    dropout = float(getattr(module, "dropout", 0.0) or 0.0)
    if getattr(module, "training", False) and dropout > 0 and L > 1:
        warnings.warn(f"from_torch: {where} ({_describe(module)}) is in training mode with dropout={dropout}; "
                      f"rnnengine computes the inference (eval-mode) result, without dropout", stacklevel=3)
    layers: list[_Layer] = []
    for k in range(L):
        Ws, Rs, Bs, Ps = [], [], [], []
        for d in range(D):
            sfx = f"_l{k}" + ("_reverse" if d else "")

            def param(name: str) -> np.ndarray:
                if not hasattr(module, name + sfx):
                    raise TypeError(f"from_torch: {where} ({_describe(module)}) has no parameter {name + sfx}; "
                                    f"only plain float nn.LSTM / nn.GRU / nn.RNN modules are read (not "
                                    f"quantized or scripted ones)")
                return _numpy(getattr(module, name + sfx), f"{where}: {name + sfx}")
            W, R = param("weight_ih"), param("weight_hh")
            H = W.shape[0] // GATES[kind]
            perm = gate_permutation(kind, H, "torch", "onnx")
            Ws.append(W[perm])
            Rs.append(R[perm])
            if bias:
                Bs.append(np.concatenate([param("bias_ih")[perm], param("bias_hh")[perm]]))
            if proj:
                Ps.append(param("weight_hr"))  # (P, H): the projection has no gates to reorder
        # layout 1 (ONNX's batch-first) when the module is batch_first, so a layer called alone
        # (layer(X)) takes the module's layout too
        attrs = dict(direction="bidirectional" if D == 2 else "forward", layout=int(batch_first),
                     name=f"{where.replace('the module', kind.lower())}.l{k}")
        W, R, B = np.stack(Ws), np.stack(Rs), np.stack(Bs) if bias else None
        if kind == "LSTM":
            layers.append(LSTM(W, R, B, projection=np.stack(Ps) if proj else None, **attrs))
        elif kind == "GRU":
            # PyTorch's GRU applies the reset gate after the recurrent product: r * (W_hn h + b_hn)
            layers.append(GRU(W, R, B, linear_before_reset=1, **attrs))
        else:
            layers.append(RNN(W, R, B, activations=["Relu" if mode == "RNN_RELU" else "Tanh"], **attrs))
    return layers, (kind, L, D), batch_first


class TorchModel(LayerModel):
    """A :class:`rnnengine.Model` made by :func:`from_torch`, with conversions between its
    per-layer state and PyTorch's stacked ``h_n`` / ``(h_n, c_n)`` (one per module)."""

    def __init__(self, layers: Any, modules: list[tuple[str, int, int]], container: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(layers, **kwargs)
        self.torch_modules = modules  # per module: (kind, num_layers, num_directions)
        self.torch_container = container  # made from an nn.Sequential / nn.ModuleList: states are lists

    def from_torch_state(self, hx: Any) -> dict[str, Any]:
        """PyTorch's initial state -> this model's state (:class:`rnnengine.State`, for
        ``run(state=)``, ``stream(state=)``, ``set_state``): for one module ``h0`` (GRU, RNN)
        or ``(h0, c0)`` (LSTM), h0 of shape (num_layers * D, batch, proj_size or hidden_size),
        c0 (num_layers * D, batch, hidden_size); for a Sequential / ModuleList, a list of those,
        one per module."""
        entries = hx if self.torch_container else [hx]
        if not isinstance(entries, (list, tuple)) or len(entries) != len(self.torch_modules):
            raise ValueError(f"from_torch_state: expected a list of {len(self.torch_modules)} states, one per "
                             f"module, got {type(entries).__name__}")
        state: list[Any] = []
        for m, ((kind, L, D), entry) in enumerate(zip(self.torch_modules, entries)):
            if kind == "LSTM":
                if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                    raise ValueError(f"from_torch_state: module {m} is an LSTM: its state is a pair (h0, c0)")
                h, c = _numpy(entry[0], f"module {m} h0"), _numpy(entry[1], f"module {m} c0")
            else:
                h, c = _numpy(entry, f"module {m} h0"), None
            for nm, a in (("h0", h), ("c0", c)):
                if a is not None and (a.ndim != 3 or a.shape[0] != L * D):
                    raise ValueError(f"from_torch_state: module {m} {nm} must have shape (num_layers * "
                                     f"num_directions = {L * D}, batch, features), got {a.shape}")
            for k in range(L):
                rows = slice(k * D, (k + 1) * D)
                state.append((h[rows], c[rows]) if c is not None else h[rows])
        return {"layers": {layer_key(k): e for k, e in enumerate(state)}, "inputs": {}, "context": {}}

    def to_torch_state(self, state: Mapping[str, Any]) -> Any:
        """This model's state (``run()``'s or a stream's ``get_state()``) -> PyTorch's: ``h_n``
        or ``(h_n, c_n)`` for one module, a list of those for a Sequential / ModuleList."""
        vec = self._pack_state(dict(state), self._batch_of(state))  # checked as set_state checks it
        entries = list(unpack_state(self.layers, vec, self._batch_of(state))["layers"].values())
        out: list[Any] = []
        at = 0
        for kind, L, D in self.torch_modules:
            part = entries[at:at + L]
            at += L
            if kind == "LSTM":
                out.append((np.concatenate([e[0] for e in part]), np.concatenate([e[1] for e in part])))
            else:
                out.append(np.concatenate(part))
        return out if self.torch_container else out[0]

    @staticmethod
    def _batch_of(state: Mapping[str, Any]) -> int:
        """The batch size of a state, read off its first layer's h (pack_state checks the rest)."""
        layers = state.get("layers") if isinstance(state, Mapping) else None
        first = next(iter(layers.values()), None) if isinstance(layers, Mapping) else None
        h = first[0] if isinstance(first, (list, tuple)) and first else first
        shape = np.shape(h) if h is not None else ()
        if len(shape) != 3:
            raise ValueError("to_torch_state: state must be this model's state ({'layers': {'layer0': (h, c) or h, "
                             "...}}), as run() and get_state() return it")
        return int(shape[1])


def _is_container(module: Any) -> bool:
    """True for torch's nn.Sequential / nn.ModuleList (not a user class of the same name)."""
    if type(module).__name__ not in ("Sequential", "ModuleList"):
        return False
    try:
        import torch.nn as nn
    except ImportError:
        return False
    return isinstance(module, (nn.Sequential, nn.ModuleList))


def _modules_of(module: Any, where: str = "the module") -> list[tuple[str, Any]]:
    """The recurrent modules in order, named for errors: the module itself, or the items of a
    container (nested containers flattened)."""
    if not _is_container(module):
        return [(where, module)]
    items = list(module)
    base = type(module).__name__.lower() if where == "the module" else where
    if not items:
        raise ValueError(f"from_torch: {base} is an empty {type(module).__name__}")
    return [pair for k, m in enumerate(items) for pair in _modules_of(m, f"{base}[{k}]")]


def from_torch(module: Any, *, weight_dtype: str = "float32", threads: int = 1) -> TorchModel:
    """An :class:`rnnengine.Model` computing what a live PyTorch module computes in eval mode.

    ``module``: an ``nn.LSTM`` (also with ``proj_size``), ``nn.GRU``, ``nn.RNN`` (tanh or relu),
    or an ``nn.Sequential`` / ``nn.ModuleList`` of them run one after the other (each module's
    output feeds the next). num_layers, bidirectional, bias=False and batch_first are honoured:
    the model's ``run`` and ``stream().feed`` take (batch, T, features) when the module is
    batch_first. Dropout is a training-time effect and is not applied (a warning says so
    when the module is in training mode). The weights are copied; later changes to the module
    do not reach the model.

    ``weight_dtype`` and ``threads`` are those of :class:`rnnengine.Model`. The returned model
    also converts states to and from PyTorch's layout (``from_torch_state``, ``to_torch_state``).
    """
    layers: list[_Layer] = []
    modules: list[tuple[str, int, int]] = []
    batch_first: bool | None = None
    for where, m in _modules_of(module):
        ls, shape, bf = _recurrent_layers(m, where)
        if batch_first is not None and bf != batch_first:
            raise ValueError(f"from_torch: {where} has batch_first={bf} but the modules before it have "
                             f"batch_first={batch_first}; one model takes one layout")
        if layers and ls[0].input_size != layers[-1].output_size:
            raise ValueError(f"from_torch: {where} takes input_size {ls[0].input_size}, but the module "
                             f"before it gives {layers[-1].output_size} features")
        batch_first = bf
        layers += ls
        modules.append(shape)
    return TorchModel(layers, modules, container=_is_container(module), batch_first=batch_first,
                      weight_dtype=weight_dtype, threads=threads)
