"""codes.py - every number the Python side shares with the C core, and the recurrent ops' tables, each written once.

Pure Python (NumPy only): importable without the compiled extension. The flat constants are
named as in src_c/rnnengine.h without the ``RNN_`` prefix (``OP_COPY`` is ``RNN_OP_COPY``);
tests/test_constants.py checks every one against the header's text and against the values
the C compiler gives the extension (``_core.C_CONSTANTS``), so neither side can change alone.
The tables below them (CELL_KINDS, DIRECTIONS, ...) are built from those constants only.
"""
from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

# --- rnn_status ----------------------------------------------------------------------------
STATUS_OK: Final = 0
STATUS_BAD_ARGUMENT: Final = 1
STATUS_BAD_SHAPE: Final = 2
STATUS_OUT_OF_MEMORY: Final = 3
STATUS_TOO_LARGE: Final = 4

# --- rnn_batch_result (src_c/batch.c, the session batcher) ------------------------------------
BATCH_OK: Final = 0
BATCH_CLOSED: Final = 1
BATCH_TIMEOUT: Final = 2
BATCH_FULL: Final = 3
BATCH_BAD_SLOT: Final = 4
BATCH_FAILED: Final = 5
BATCH_MAX_SLOTS: Final = 1048576

# --- rnn_cell_kind, rnn_direction, rnn_weight_dtype ------------------------------------------
CELL_RNN: Final = 0
CELL_GRU: Final = 1
CELL_LSTM: Final = 2

DIR_FORWARD: Final = 0
DIR_REVERSE: Final = 1
DIR_BIDIRECTIONAL: Final = 2

WEIGHTS_F32: Final = 0
WEIGHTS_F16: Final = 1
WEIGHTS_I8: Final = 2

# --- rnn_activation_kind (also the UNARY kinds below 20) -------------------------------------
ACT_RELU: Final = 0
ACT_TANH: Final = 1
ACT_SIGMOID: Final = 2
ACT_AFFINE: Final = 3
ACT_LEAKY_RELU: Final = 4
ACT_THRESHOLDED_RELU: Final = 5
ACT_SCALED_TANH: Final = 6
ACT_HARD_SIGMOID: Final = 7
ACT_ELU: Final = 8
ACT_SOFTSIGN: Final = 9
ACT_SOFTPLUS: Final = 10
ACT_COUNT: Final = 11

# --- the graph executor's program: RNN_INSTR_WORDS int64 words per instruction, rnn_op -------
INSTR_WORDS: Final = 16

OP_COPY: Final = 0
OP_BINARY: Final = 1
OP_UNARY: Final = 2
OP_MATMUL: Final = 3
OP_SOFTMAX: Final = 4
OP_GATHER: Final = 5
OP_CONV1D: Final = 6
OP_PAD: Final = 7
OP_REDUCE: Final = 8
OP_CAST: Final = 9
OP_RECURRENT: Final = 10
OP_TOPK: Final = 11
OP_SCATTER: Final = 12
OP_TBINARY: Final = 13
OP_TUNARY: Final = 14
OP_WHERE: Final = 15
OP_TREDUCE: Final = 16
OP_ARGMAX: Final = 17
OP_CUMSUM: Final = 18
OP_REVSEQ: Final = 19
OP_CONV1D_PACKED: Final = 20
OP_STFT: Final = 21
OP_LAYERNORM: Final = 22
OP_POOL1D: Final = 23
OP_BMATMUL: Final = 24

# --- rnn_binary_kind (BINARY, TBINARY), rnn_unary_kind (UNARY), rnn_tunary_kind, rnn_reduce_kind
BIN_ADD: Final = 0
BIN_SUB: Final = 1
BIN_MUL: Final = 2
BIN_DIV: Final = 3
BIN_POW: Final = 4
BIN_MAX: Final = 5
BIN_MIN: Final = 6
BIN_MOD: Final = 7
BIN_FMOD: Final = 8
BIN_EQUAL: Final = 10
BIN_LESS: Final = 11
BIN_LESS_EQUAL: Final = 12
BIN_GREATER: Final = 13
BIN_GREATER_EQUAL: Final = 14
BIN_AND: Final = 15
BIN_OR: Final = 16
BIN_XOR: Final = 17

UNARY_SQRT: Final = 20
UNARY_EXP: Final = 21
UNARY_LOG: Final = 22
UNARY_NEG: Final = 23
UNARY_ABS: Final = 24
UNARY_CLIP: Final = 25
UNARY_RECIPROCAL: Final = 26
UNARY_ERF: Final = 27
UNARY_FLOOR: Final = 28
UNARY_CEIL: Final = 29

TUNARY_NEG: Final = 0
TUNARY_ABS: Final = 1
TUNARY_NOT: Final = 2

REDUCE_SUM: Final = 0
REDUCE_MEAN: Final = 1
REDUCE_MAX: Final = 2
REDUCE_MIN: Final = 3
REDUCE_PROD: Final = 4

# --- rnn_dtype: element types of the executor's tensors --------------------------------------
DT_F32: Final = 0
DT_I64: Final = 1
DT_I32: Final = 2
DT_U8: Final = 3
DT_BOOL: Final = 4
DT_OTHER: Final = 100  # + the element size: a type the executor only moves (float64, int8, ...)

# The C prefixes of the constants above: RNN_ + one of these (tests/test_constants.py).
C_PREFIXES: Final = ("STATUS_", "BATCH_", "CELL_", "DIR_", "WEIGHTS_", "ACT_", "INSTR_", "OP_", "BIN_", "UNARY_",
                     "TUNARY_", "REDUCE_", "DT_")


def c_constants() -> dict[str, int]:
    """Every constant of this module under its src_c/rnnengine.h name (``RNN_OP_COPY``: 0, ...)."""
    return {"RNN_" + name: value for name, value in globals().items()
            if name.startswith(C_PREFIXES) and type(value) is int}


# --- tables built from the constants -------------------------------------------------------
CELL_KINDS: Final[dict[str, int]] = {"RNN": CELL_RNN, "GRU": CELL_GRU, "LSTM": CELL_LSTM}
# G of the dimension legend: gates per cell kind, stacked in ONNX order (LSTM i, o, f, c;
# GRU z, r, h) in W (G*H, I), R (G*H, H) and B (2*G*H).
GATES: Final[dict[str, int]] = {"RNN": 1, "GRU": 3, "LSTM": 4}
DIRECTIONS: Final[dict[str, int]] = {"forward": DIR_FORWARD, "reverse": DIR_REVERSE,
                                     "bidirectional": DIR_BIDIRECTIONAL}
# how a cell's packed weights are stored (rnn_cell_config.weight_dtype)
WEIGHT_DTYPES: Final[dict[str, int]] = {"float32": WEIGHTS_F32, "float16": WEIGHTS_F16, "int8": WEIGHTS_I8}

# NumPy dtype -> the rnn_dtype code of the types the executor computes on
TENSOR_DTYPES: Final[dict[np.dtype[np.generic], int]] = {
    np.dtype(np.float32): DT_F32, np.dtype(np.int64): DT_I64, np.dtype(np.int32): DT_I32,
    np.dtype(np.uint8): DT_U8, np.dtype(np.bool_): DT_BOOL}


def tensor_code(dtype: npt.DTypeLike) -> int:
    """The tensor table's element type code of a NumPy dtype: its rnn_dtype, or DT_OTHER + its
    size for a type the executor only moves."""
    dt = np.dtype(dtype)
    code = TENSOR_DTYPES.get(dt)
    return DT_OTHER + dt.itemsize if code is None else code


# --- element types by name -----------------------------------------------------------------
# ONNX TensorProto element type -> NumPy type (the types a converted graph may hold)
ONNX_DTYPE: Final[dict[int, type[np.generic]]] = {
    1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 9: np.bool_,
    10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}
# a graph input's or output's dtype name (as the IR and the weight file write it) -> NumPy type
NP_DTYPES: Final[dict[str, type[np.generic]]] = {
    "float32": np.float32, "int64": np.int64, "int32": np.int32, "bool": np.bool_, "uint8": np.uint8,
    "float64": np.float64, "float16": np.float16, "int8": np.int8}

# --- the ONNX recurrent operators ----------------------------------------------------------
RECURRENT_OPS: Final = ("LSTM", "GRU", "RNN")
# their inputs, by position (ONNX), and the position of each
RECURRENT_INPUTS: Final = ("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P")
SLOT_X: Final = 0
SLOT_W: Final = 1
SLOT_R: Final = 2
SLOT_B: Final = 3
SLOT_SEQUENCE_LENS: Final = 4
SLOT_INITIAL_H: Final = 5
SLOT_INITIAL_C: Final = 6
SLOT_P: Final = 7
# how many of them each op has (GRU and RNN have no initial_c and no P)
RECURRENT_N_INPUTS: Final[dict[str, int]] = {"LSTM": 8, "GRU": 6, "RNN": 6}
# their attributes: those all three take, and each one's own
RECURRENT_COMMON_ATTRS: Final = frozenset({"activation_alpha", "activation_beta", "activations", "clip",
                                           "direction", "hidden_size", "layout"})
RECURRENT_OWN_ATTRS: Final[dict[str, frozenset[str]]] = {
    "LSTM": frozenset({"input_forget"}), "GRU": frozenset({"linear_before_reset"}), "RNN": frozenset()}
RECURRENT_ATTRS: Final = tuple(sorted(RECURRENT_COMMON_ATTRS.union(*RECURRENT_OWN_ATTRS.values())))


def recurrent_attrs(kind: str) -> frozenset[str]:
    """The attributes ONNX defines for the recurrent op ``kind`` (layout from opset 14)."""
    return RECURRENT_COMMON_ATTRS | RECURRENT_OWN_ATTRS[kind]
