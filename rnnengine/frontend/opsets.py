"""opsets.py - which versions of each ONNX operator rnnengine implements (default domain).

An ONNX model imports an opset N; each of its nodes then means the newest version of its op
defined at or before N (``onnx.defs.get_schema(op, N).since_version``). VERSIONS lists, for
every op rnnengine knows (the handlers in rnnengine/ops.py, and If / Loop / the sequence ops
planned in rnnengine/graph.py), every version in effect at some opset from MIN_OPSET on,
with what changed at that version and whether the handlers implement it. The converter
refuses a node whose version is missing here (a newer onnx release defined it and nobody
has reviewed it yet) or marked refused, naming the op, node, opset and what changed.
tests/test_opsets.py checks this table against onnx.defs, so a new op version in a new onnx
release fails a test instead of being accepted silently.

Most changes only widen the element types an op accepts (bfloat16 at opset 13 and 22,
8-, 4- and 2-bit types from opset 19 on); rnnengine's own type checks refuse types it
cannot compute, so those versions mean nothing new to it.
"""
from __future__ import annotations

from typing import Any

from rnnengine.errors import OpsetError  # noqa: F401 (re-exported)
from rnnengine.frontend.schemas import ONNX_OPSET, SCHEMAS

MIN_OPSET = 7


def repeated(names: list[str]) -> list[str]:
    """The names that occur more than once, sorted: a graph's inputs and its state pairs name
    each input (and, for state pairs, each output) once (the converter and the weight-file
    reader refuse the rest, naming them)."""
    seen: set[str] = set()
    twice: set[str] = set()
    for n in names:
        (twice if n in seen else seen).add(n)
    return sorted(twice)

BF16 = "adds bfloat16 (types only)"
INTS = "adds integer types (types only)"
LOWBIT = "adds float8 / int4 / float4 / int2 / float6 types (types only)"
NEG_AXIS = "negative axes / indices allowed (implemented: axes are normalised)"
ATTR_TO_INPUT = "moves a constant attribute to an input (implemented: read from either)"
BROADCAST7 = "numpy-style broadcasting replaces the broadcast/axis attributes (implemented)"
CONSUMED = "drops the legacy consumed_inputs attribute"

# The op versions an elementwise unary op went through: 6 (consumed_inputs), 13 (bfloat16).
_UNARY6 = {6: CONSUMED, 13: BF16}
_BINARY = {7: BROADCAST7, 13: BF16, 14: INTS}
_COMPARE = {7: BROADCAST7, 9: INTS, 13: BF16}
_LOGIC = {7: BROADCAST7}
_LOWBIT_19_25 = {19: LOWBIT, 21: LOWBIT, 23: LOWBIT, 24: LOWBIT, 25: LOWBIT}
_CONTROL = {11: "branch / body outputs may change shape between iterations (implemented: planned per shape)",
            13: "sequence types (types only)", 16: "optional types and bfloat16 (types only)", **_LOWBIT_19_25}
_REDUCE = {1: "axes attribute (implemented)", 11: NEG_AXIS, 13: BF16, 18: "axes become an input, noop_with_empty_axes (implemented)"}
_REC = {7: "drops output_sequence", 14: "layout attribute (implemented, batch-first)", 22: BF16}
_ACT22 = {22: BF16}
REFUSED = "refused: "  # a note starting with this marks a version rnnengine does not implement

VERSIONS = {
    "Abs": {6: CONSUMED + "; " + INTS, 13: BF16},
    "Add": _BINARY, "Sub": _BINARY, "Mul": _BINARY, "Div": _BINARY,
    "Pow": {7: BROADCAST7, 12: "exponent of another type; integer bases (implemented with NumPy's power)",
            13: BF16, 15: "bfloat16 exponent (types only)"},
    "Max": {6: CONSUMED, 8: "numpy-style broadcasting (implemented)", 12: INTS, 13: BF16},
    "Min": {6: CONSUMED, 8: "numpy-style broadcasting (implemented)", 12: INTS, 13: BF16},
    "And": _LOGIC, "Or": _LOGIC, "Xor": _LOGIC,
    "Not": {1: "unchanged since opset 1"},
    "Equal": {7: BROADCAST7, 11: "float and more integer types (types only)", 13: BF16, 19: "string (types only)"},
    "Less": _COMPARE, "Greater": _COMPARE,
    "LessOrEqual": {12: "introduced", 16: BF16}, "GreaterOrEqual": {12: "introduced", 16: BF16},
    "Where": {9: "introduced", 16: BF16},
    "Relu": {6: CONSUMED, 13: BF16, 14: INTS},
    "Neg": {6: CONSUMED + "; " + INTS, 13: BF16},
    **{op: dict(_UNARY6) for op in ("Ceil", "Exp", "Floor", "Log", "Reciprocal", "Sigmoid", "Sqrt", "Tanh")},
    "Elu": {6: CONSUMED, 22: BF16}, "HardSigmoid": {6: CONSUMED, 22: BF16},
    "LeakyRelu": {6: CONSUMED, 16: BF16},
    "Softplus": {1: "unchanged until opset 22", **_ACT22}, "Softsign": {1: "unchanged until opset 22", **_ACT22},
    "ThresholdedRelu": {10: "introduced", 22: BF16},
    "Clip": {6: "min / max attributes", 11: "min / max become optional inputs (implemented)", 12: INTS, 13: BF16},
    "Cast": {6: "`to` is an integer", 9: "string (types only)", 13: BF16,
             19: "saturate attribute, for float8 targets only (float8 is refused as a type)",
             21: LOWBIT, 23: LOWBIT,
             24: "round_mode attribute for float8e8m0 (refused as an attribute) and float8e8m0",
             25: LOWBIT, 28: LOWBIT},
    "Constant": {1: "value attribute", 9: "more types (types only)",
                 11: "sparse_value (refused as an attribute)",
                 12: "value_float(s) / value_int(s) (implemented); value_string(s) (refused as attributes)",
                 13: BF16, **_LOWBIT_19_25},
    "ConstantOfShape": {9: "introduced", 20: LOWBIT, 21: LOWBIT, 23: LOWBIT, 24: LOWBIT, 25: LOWBIT},
    "Shape": {1: "the whole shape", 13: BF16, 15: "start / end attributes (implemented)", **_LOWBIT_19_25},
    "Size": {1: "element count", 13: BF16, **_LOWBIT_19_25},
    "Range": {11: "introduced",
              27: "float16 / bfloat16 inputs, accumulated as stash_type (rnnengine refuses float16 Range "
                  "and the attribute; int and float32 inputs are unchanged)"},
    "Identity": {1: "tensors", 13: BF16, 14: "sequence inputs (implemented: passed through)",
                 16: "optional types (types only)", **_LOWBIT_19_25},
    "Dropout": {7: "drops is_test (inference: identity)", 10: "bool mask (types only)",
                12: "ratio and training_mode become inputs (implemented; training_mode must be constant false)",
                13: BF16, 22: LOWBIT},
    "Reshape": {5: "shape becomes an input (implemented)", 13: BF16, 14: "allowzero attribute (implemented)",
                **_LOWBIT_19_25},
    "Flatten": {1: "axis attribute", 9: "more types (types only)", 11: NEG_AXIS, 13: BF16,
                21: LOWBIT, 23: LOWBIT, 24: LOWBIT, 25: LOWBIT},
    "Squeeze": {1: "axes attribute", 11: NEG_AXIS, 13: "axes become an input; " + BF16 + " (implemented)",
                21: LOWBIT, 23: LOWBIT, 24: LOWBIT, 25: LOWBIT},
    "Unsqueeze": {1: "axes attribute", 11: NEG_AXIS, 13: "axes become an input; " + BF16 + " (implemented)",
                  21: LOWBIT, 23: LOWBIT, 24: LOWBIT, 25: LOWBIT},
    "Transpose": {1: "perm attribute", 13: BF16, 21: LOWBIT, 23: LOWBIT, 24: LOWBIT, 25: LOWBIT},
    "Slice": {1: "starts / ends / axes attributes (implemented)",
              10: "starts / ends / axes / steps inputs (implemented)", 11: NEG_AXIS, 13: BF16},
    "Concat": {4: "axis required", 11: NEG_AXIS, 13: BF16},
    "Split": {2: "split attribute", 11: NEG_AXIS, 13: "split becomes an input (implemented); " + BF16,
              18: "num_outputs attribute, last part may be smaller (implemented)"},
    "Expand": {8: "introduced", 13: BF16},
    "Tile": {6: "repeats input", 13: BF16},
    "Gather": {1: "gather along an axis", 11: NEG_AXIS, 13: BF16},
    "ArgMax": {1: "axis, keepdims (implemented)", 11: NEG_AXIS, 12: "select_last_index (implemented)", 13: BF16},
    "ArgMin": {1: "axis, keepdims (implemented)", 11: NEG_AXIS, 12: "select_last_index (implemented)", 13: BF16},
    "CumSum": {11: "introduced (exclusive, reverse implemented)", 14: "bfloat16 / float16 (types only)"},
    "Mod": {10: "introduced: fmod=0 on integers (floor), fmod=1 (truncation) (implemented)", 13: BF16,
            28: "fmod=0 also defined for floats, A - floor(A/B)*B (integers implemented; float fmod=0 is "
                "refused by the handler)"},
    "ReverseSequence": {10: "introduced (batch_axis / time_axis, implemented)", 28: BF16},
    "TopK": {1: "k attribute (implemented)", 10: "k becomes an input (implemented)",
             11: "largest / sorted attributes (implemented; results always sorted), " + INTS, 24: BF16},
    "ScatterElements": {11: "introduced", 13: BF16, 16: "reduction attribute (only 'none' is implemented; "
                        "others are refused)", 18: "reduction max / min (refused like every reduction)"},
    "Scatter": {9: "introduced", 11: REFUSED + "Scatter is deprecated from opset 11 on (use ScatterElements)"},
    "MatMul": {1: "numpy matmul", 9: INTS, 13: BF16},
    "Gemm": {7: "drops the broadcast attribute (unidirectional broadcast of C)", 9: INTS,
             11: "C becomes optional (implemented)", 13: BF16},
    "Softmax": {1: "coerces to 2-D at axis (implemented)", 11: NEG_AXIS,
                13: "normalises along one axis, default -1 (implemented)"},
    "LogSoftmax": {1: "coerces to 2-D at axis (implemented)", 11: NEG_AXIS,
                   13: "normalises along one axis, default -1 (implemented)"},
    "Erf": {9: "introduced", 13: BF16},
    "Selu": {6: CONSUMED, 22: BF16},
    "HardSwish": {14: "introduced", 22: BF16},
    "Mish": {18: "introduced", 22: BF16},
    "ReduceSumSquare": dict(_REDUCE), "ReduceL1": dict(_REDUCE), "ReduceL2": dict(_REDUCE),
    "InstanceNormalization": {6: CONSUMED, 22: BF16},
    "GlobalAveragePool": {1: "mean over the axes after (N, C) (implemented)", 22: BF16},
    "Gelu": {20: "introduced (approximate none / tanh, implemented)"},
    "PRelu": {7: "numpy-style unidirectional broadcast of the slope (implemented)", 9: INTS, 16: BF16},
    "BatchNormalization": {7: "is_test dropped; spatial attribute (spatial=1 implemented, 0 refused)",
                           9: "spatial dropped (per channel) (implemented)", 14: "training_mode attribute (0 "
                           "implemented: inference with the stored statistics; 1 refused)", 15: "scale / bias / "
                           "statistics may have their own float types (float32 implemented)"},
    "LayerNormalization": {17: "introduced (axis, epsilon; stash_type 1; Scale / B broadcast to X) (implemented)"},
    "Conv": {1: "convolution", 11: "clarified auto_pad / kernel_shape (no change in the result)", 22: BF16},
    "MaxPool": {1: "largest of each window, 1-D (implemented)", 8: "storage_order and the Indices output (Indices "
                "refused)", 10: "ceil_mode, dilations (implemented)", 11: "clarified pads (no change in the result)",
                12: "int8 / uint8 (types only)", 22: BF16},
    "AveragePool": {7: "mean of each window, 1-D; count_include_pad (implemented)",
                    10: "ceil_mode (implemented)", 11: "clarified pads (no change in the result)",
                    19: "dilations (1 only; others refused)", 22: BF16},
    "Pad": {2: "pads / value attributes (implemented)", 11: "pads / constant_value inputs (implemented); " + INTS,
            13: "more types (types only)", 18: "axes input (implemented)", 19: "wrap mode (implemented)",
            21: LOWBIT, 23: LOWBIT, 24: LOWBIT, 25: LOWBIT},
    "ReduceSum": {1: "axes attribute (implemented)", 11: NEG_AXIS, 13: "axes become an input, noop_with_empty_axes (implemented); " + BF16},
    "ReduceMean": dict(_REDUCE), "ReduceProd": dict(_REDUCE),
    "ReduceMax": {**_REDUCE, 12: INTS, 20: "bool (types only)"},
    "ReduceMin": {**_REDUCE, 12: INTS, 20: "bool (types only)"},
    "LSTM": _REC, "GRU": _REC, "RNN": _REC,
    "If": {1: "branches", **_CONTROL},
    "Loop": {1: "loop", **_CONTROL},
    "SplitToSequence": {11: "introduced", 24: BF16},
    **{op: {11: "introduced"} for op in ("SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceLength",
                                         "SequenceInsert", "ConcatFromSequence")},
}


def max_opset():
    """The newest opset rnnengine accepts: the newest the installed onnx package defines
    (every op version up to it is either in VERSIONS or refused by check_node)."""
    import onnx.defs  # the converter's path (it reads ONNX): not imported to load a weight file
    return onnx.defs.onnx_opset_version()


def op_version(op, opset):
    """The version of ``op`` a model importing ``opset`` uses (its since_version), or None
    when the op does not exist at that opset."""
    import onnx.defs
    try:
        return onnx.defs.get_schema(op, opset, "").since_version
    except onnx.defs.SchemaError:
        return None


class _Formal:
    __slots__ = ("name", "option")

    def __init__(self, name: str, option: str) -> None:
        self.name, self.option = name, option


class _Attr:
    __slots__ = ("type", "required")

    def __init__(self, type_: str, required: bool) -> None:
        self.type, self.required = type_, required


class _Schema:
    """The part of an onnx.defs.OpSchema rnnengine reads, from rnnengine/frontend/schemas.py."""

    def __init__(self, row: tuple[Any, ...]) -> None:
        since, self.min_input, self.max_input, self.max_output, formals, attrs = row
        self.since_version = since
        self.inputs = [_Formal(n, o) for n, o in formals]
        self.attributes = {n: _Attr(t, r) for n, t, r in attrs}


_TABLE: dict[tuple[str, int], _Schema | None] = {}


def check_node(op, opset, label):
    """Raises OpsetError (naming ``label``, e.g. "LSTM node 'rnn'") unless rnnengine implements
    the version of ``op`` in effect at ``opset``."""
    table = VERSIONS.get(op)
    if table is None:
        raise OpsetError(f"{label}: op {op!r} has no entry in rnnengine's opset table (rnnengine/opsets.py)")
    v = op_version(op, opset)
    if v is None:
        raise OpsetError(f"{label}: op {op} does not exist at opset {opset}")
    note = table.get(v)
    if note is None:
        raise OpsetError(f"{label}: {op} changed at opset {v} (the version a model at opset {opset} uses), and "
                         f"rnnengine has not reviewed that version (known: {sorted(table)}); "
                         "it is refused rather than run with older semantics")
    if note.startswith(REFUSED):
        raise OpsetError(f"{label}: {op} at opset {opset} (version {v}) is not supported: {note[len(REFUSED):]}")
    return v


def schema(op, opset):
    """onnx.defs' schema of op at opset (None for an op or opset onnx does not define): for the
    ops rnnengine implements, from the table generated from onnx.defs (schemas.py; no onnx
    import), else from onnx.defs itself."""
    try:
        at = max(1, min(int(opset or 1), ONNX_OPSET))
    except (TypeError, ValueError, OverflowError):
        return None
    rows = SCHEMAS.get(op)
    if rows is not None:
        key = (op, at)
        if key not in _TABLE:
            row = max((r for r in rows if r[0] <= at), key=lambda r: r[0], default=None)
            _TABLE[key] = None if row is None else _Schema(row)
        return _TABLE[key]
    try:
        import onnx.defs
        return onnx.defs.get_schema(op, max(1, min(at, onnx.defs.onnx_opset_version())), "")
    except Exception:
        return None


def check_structure(op, opset, inputs, outputs, attrs, label, extra_inputs=(), slots=0, attr_types=None,
                    variadic_full=True):
    """Raises OpsetError (naming ``label``) unless a node of ``op`` at ``opset`` has what the
    ONNX schema requires: an input count the op takes (``extra_inputs``: slot numbers beyond
    the schema's inputs that rnnengine's own converted cells may name, e.g. a step mask;
    ``slots``: a length the input list may have with the slots past the schema's left empty),
    every single (non-optional) input named, no empty member of a variadic input, one to
    max outputs with at least one named, every required attribute, and, when ``attr_types``
    (name -> ONNX attribute type name such as "INT", "INTS", "GRAPH") is given, each
    attribute of the type the schema declares. Handlers can then index inputs and read
    attributes without guarding against a hostile file's shape of a node."""
    # an op newer than the graph's opset (a weight file names any opset) is held to its
    # latest schema; the converter refuses such nodes earlier, by check_node
    sch = schema(op, opset) or schema(op, ONNX_OPSET)
    if sch is None:
        return
    most = max([sch.max_input, slots] + [j + 1 for j in extra_inputs])
    for j in range(sch.max_input, len(inputs)):
        if inputs[j] and j not in extra_inputs:
            raise OpsetError(f"{label}: {op} has no input {j} (named {inputs[j]!r})")
    if not sch.min_input <= len(inputs) <= most:
        raise OpsetError(f"{label}: {op} takes {sch.min_input} to {most} inputs, got {len(inputs)}")
    formals = list(sch.inputs)
    for j, formal in enumerate(formals):
        if j < len(inputs) and not inputs[j] and "Single" in str(formal.option):
            raise OpsetError(f"{label}: {op} needs its input {formal.name!r} (input {j})")
    if variadic_full and formals and "Variadic" in str(formals[-1].option):
        for j in range(len(formals) - 1, len(inputs)):  # Concat's, Sum's...: none may be left out
            if not inputs[j]:
                raise OpsetError(f"{label}: {op} input {j} (of {formals[-1].name!r}) is empty")
    if not outputs or not any(outputs) or len(outputs) > sch.max_output:
        raise OpsetError(f"{label}: {op} has {len(outputs)} outputs {str(list(outputs))[:80]}; it writes 1 to "
                         f"{sch.max_output}, at least one of them named")
    for name, a in sch.attributes.items():
        if a.required and name not in attrs:
            raise OpsetError(f"{label}: {op} needs its attribute {name!r}")
    if attr_types:
        for name, got in attr_types.items():
            a = sch.attributes.get(name)
            want = str(a.type).rsplit(".", 1)[-1] if a is not None else None
            if want is not None and got != want:
                raise OpsetError(f"{label}: attribute {name!r} of {op} must be of type {want}, the file gives {got}")
