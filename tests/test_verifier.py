"""The program verifier (src_c/graph.c rnn_graph_verify), tested directly: hand-made
_core.Program objects with bad tensor ids, parameter slices, element types, offsets, strides,
sizes, stacks and workspaces are each refused when the Program is created, with a ProgramError
naming the instruction (and its node, when labelled); valid programs pass and compute what
NumPy computes; run-time checks of data (indices, lengths) still fire; and every program the
planner makes for the exported-model corpus passes (no false refusals)."""
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import rnnengine
from rnnengine import _core
from rnnengine.runtime import graph
from rnnengine.ops.handlers import (OP_ARGMAX, OP_BINARY, OP_CAST, OP_CONV1D, OP_CONV1D_PACKED, OP_COPY, OP_GATHER, OP_MATMUL, OP_PAD,
                           OP_RECURRENT, OP_REDUCE, OP_REVSEQ, OP_SCATTER, OP_SOFTMAX, OP_TBINARY, OP_TOPK,
                           OP_TREDUCE, OP_UNARY, OP_WHERE, pack_panels)

F32, I64, I32, U8, BOOL = 0, 1, 2, 3, 4
W = _core.INSTR_WORDS


def instr(op, ins=(), outs=(), ip_off=0, n_ip=0, fp_off=0, n_fp=0, aux=-1):
    word = [op] + [-1] * (W - 1)
    for k, t in enumerate(ins):
        word[1 + k] = t
    for k, t in enumerate(outs):
        word[5 + k] = t
    word[8], word[9], word[10], word[11], word[12] = aux, ip_off, n_ip, fp_off, n_fp
    return word


def program(instrs, ip, table, fp=(), stacks=(), work=16, labels=None, tensor_writable=None):
    """A Program of instructions (each (op, ins, outs, ip list[, fp list[, aux]])) with their
    parameters laid out one after the other, over tensors table [(type code, count)]."""
    words, ips, fps = [], [], []
    for k, ins_ in enumerate(instrs):
        op, ins, outs, p = ins_[:4]
        f = ins_[4] if len(ins_) > 4 else []
        aux = ins_[5] if len(ins_) > 5 else -1
        words.append(instr(op, ins, outs, len(ips), len(p), len(fps), len(f), aux))
        ips += list(p)
        fps += list(f)
    if ip is not None:  # raw parameters given: the offsets/counts above stand as computed
        ips = ip
    return _core.Program(np.array(words, np.int64).reshape(-1, W), np.array(ips, np.int64),
                         np.array(fps if not fp else fp, np.float32), list(stacks), labels,
                         tensor_dtypes=[t for t, _ in table], tensor_counts=[n for _, n in table],
                         work_floats=work, tensor_writable=tensor_writable)


def refused(match, *args, **kw):
    with pytest.raises(_core.ProgramError, match=match) as info:
        program(*args, **kw)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def bind(*arrays, work=16):
    return (np.array([_core.address(a) for a in arrays], np.int64), np.zeros(work, np.float32))


def copy_ip(es, shape, ss, ds, so=0, do=0):
    return [es, len(shape), so, do] + list(shape) + list(ss) + list(ds)


# --- a valid program passes and computes --------------------------------------------------------

def test_a_valid_program_is_accepted_and_runs():
    """A transpose (COPY), a broadcast add (BINARY) and a matrix product (MATMUL): what NumPy gives."""
    r = np.random.default_rng(0)
    x = r.standard_normal((3, 4)).astype(np.float32)
    b = r.standard_normal(3).astype(np.float32)
    wt = r.standard_normal((5, 3)).astype(np.float32)  # B (N, K), packed in one panel of 16 rows
    wp = pack_panels(wt)
    xt, s, y = np.zeros((4, 3), np.float32), np.zeros((4, 3), np.float32), np.zeros((4, 5), np.float32)
    p = program([(OP_COPY, [0], [1], copy_ip(4, (4, 3), (1, 4), (3, 1))),
                 (OP_BINARY, [1, 2], [3], [0, 2, 4, 3, 3, 1, 0, 1]),
                 (OP_MATMUL, [3, 4, -1], [5], [4, 5, 3])], None,
                [(F32, 12), (F32, 12), (F32, 3), (F32, 12), (F32, 48), (F32, 20)])
    p.run(*bind(x, xt, b, s, wp, y))
    np.testing.assert_allclose(y, (x.T + b) @ wt.T, rtol=1e-5, atol=1e-6)
    assert p.n_tensors == 6 and p.work_floats == 16


# --- one test per check class -------------------------------------------------------------------

def test_tensor_ids_out_of_range():
    refused(r"instruction 0 \(COPY\): input names tensor 5, the program has tensors 0\.\.1",
            [(OP_COPY, [5], [1], copy_ip(4, (2,), (1,), (1,)))], None, [(F32, 2), (F32, 2)])
    refused(r"instruction 0 \(COPY\): output names tensor -3",
            [(OP_COPY, [0], [-3], copy_ip(4, (2,), (1,), (1,)))], None, [(F32, 2), (F32, 2)])
    refused(r"instruction 0 \(COPY\): output is missing",
            [(OP_COPY, [0], [], copy_ip(4, (2,), (1,), (1,)))], None, [(F32, 2), (F32, 2)])
    refused(r"instruction 0 \(COPY\): input slot 1 names tensor 1, the op takes 1 inputs",
            [(OP_COPY, [0, 1], [1], copy_ip(4, (2,), (1,), (1,)))], None, [(F32, 2), (F32, 2)])
    refused(r"instruction 1 \(RECURRENT\): names stack 0, the program has 0",
            [(OP_COPY, [0], [1], copy_ip(4, (2,), (1,), (1,))),
             (OP_RECURRENT, [0], [1], [1, 1, 0, 1, 1, 0, 0, 0, -1], [], 0)], None, [(F32, 2), (F32, 2)])


def test_parameter_slices_outside_the_arrays_or_short():
    good = copy_ip(4, (2,), (1,), (1,))
    table = [(F32, 2), (F32, 2)]
    word = instr(OP_COPY, [0], [1], 0, len(good) + 1)  # one parameter more than there are
    with pytest.raises(_core.ProgramError, match=r"instruction 0 \(COPY\): int parameters \[0, \+8\) lie outside the 7"):
        _core.Program(np.array([word]), np.array(good), np.zeros(0, np.float32), [], tensor_dtypes=[0, 0],
                      tensor_counts=[2, 2], work_floats=16)
    word = instr(OP_COPY, [0], [1], -1, len(good))
    with pytest.raises(_core.ProgramError, match="int parameters"):
        _core.Program(np.array([word]), np.array(good), np.zeros(0, np.float32), [], tensor_dtypes=[0, 0],
                      tensor_counts=[2, 2], work_floats=16)
    word = instr(OP_UNARY, [0], [1], 0, 2, 1, 2)  # fparams [1, 3) of 2
    with pytest.raises(_core.ProgramError, match=r"instruction 0 \(UNARY\): float parameters \[1, \+2\) lie outside the 2"):
        _core.Program(np.array([word]), np.array([1, 2]), np.zeros(2, np.float32), [], tensor_dtypes=[0, 0],
                      tensor_counts=[2, 2], work_floats=16)
    # short: a rank-2 copy given the parameters of rank 1; a unary without its alpha / beta
    refused(r"instruction 0 \(COPY\): has 7 int parameters, the op reads 10",
            [(OP_COPY, [0], [1], [4, 2, 0, 0, 2, 1, 1])], None, table)
    refused(r"instruction 0 \(UNARY\): has 1 float parameters, the op reads 2",
            [(OP_UNARY, [0], [1], [1, 2], [0.0])], None, table)
    refused(r"instruction 0 \(MATMUL\): has 2 int parameters, the op reads 3",
            [(OP_MATMUL, [0, 0, -1], [1], [1, 1])], None, table)
    refused(r"instruction 0 \(SOFTMAX\): has 1 float parameters, the op reads none",
            [(OP_SOFTMAX, [0], [1], [1, 2, 1, 0], [1.0])], None, table)


def test_operand_element_types():
    """Float ops take float32; index inputs int64 (Gather, Scatter, ReverseSequence) or int32
    (recurrent lengths); typed ops the type their dtype word says; copies move equal types."""
    refused(r"instruction 0 \(SOFTMAX\): input is uint8, the instruction takes float32",
            [(OP_SOFTMAX, [0], [1], [2, 3, 1, 0])], None, [(U8, 6), (F32, 6)])
    refused(r"instruction 0 \(MATMUL\): input A is bool, the instruction takes float32",
            [(OP_MATMUL, [0, 1, -1], [2], [2, 4, 3])], None, [(BOOL, 6), (F32, 12), (F32, 8)])
    refused(r"instruction 0 \(CONV1D\): input is int32, the instruction takes float32",
            [(OP_CONV1D, [0, 1, -1], [2], [1, 2, 5, 3, 2, 4, 1, 1, 0, 1])], None,
            [(I32, 10), (F32, 12), (F32, 12)], work=64)
    refused(r"instruction 0 \(GATHER\): indices is int32, the instruction takes int64",
            [(OP_GATHER, [0, 1], [2], [4, 1, 3, 2, 2])], None, [(F32, 6), (I32, 2), (F32, 4)])
    refused(r"instruction 0 \(TBINARY\): input A is int32, the instruction takes int64",
            [(OP_TBINARY, [0, 1], [2], [1, 0, 1, 4, 1, 1])], None, [(I32, 4), (I64, 4), (I64, 4)])
    refused(r"instruction 0 \(COPY\): input has 8-byte elements \(int64\), the instruction moves 4-byte ones",
            [(OP_COPY, [0], [1], copy_ip(4, (2,), (1,), (1,)))], None, [(I64, 2), (F32, 2)])
    refused(r"instruction 0 \(COPY\): copies int32 into float32",
            [(OP_COPY, [0], [1], copy_ip(4, (2,), (1,), (1,)))], None, [(I32, 2), (F32, 2)])
    refused(r"instruction 0 \(CAST\): input float32 and output int64, the instruction casts int64 to int32",
            [(OP_CAST, [0], [1], [1, 2, 2])], None, [(F32, 2), (I64, 2)])
    refused(r"instruction 0 \(WHERE\): condition is float32, the instruction takes bool",
            [(OP_WHERE, [0, 1, 1], [2], [4, 1, 2, 1, 1, 1])], None, [(F32, 2), (F32, 2), (F32, 2)])
    refused(r"instruction 0 \(COPY\): output is tensor 1 of unknown element type code 7",
            [(OP_COPY, [0], [1], copy_ip(4, (2,), (1,), (1,)))], None, [(F32, 2), (7, 2)])
    # another type (here float64, 8 bytes) may be moved but not computed on
    program([(OP_COPY, [0], [1], copy_ip(8, (2,), (1,), (1,)))], None, [(_core.tensor_code(np.float64), 2)] * 2)
    refused("input is a type the executor does not compute on, the instruction takes float32",
            [(OP_UNARY, [0], [1], [1, 2], [0, 0])], None, [(_core.tensor_code(np.float64), 2), (F32, 2)])


def test_reads_and_writes_stay_inside_their_buffers():
    # Split with a negative size: its second part read from element -2
    refused(r"instruction 0 \(COPY\): input: the instruction reads element -2, before its start",
            [(OP_COPY, [0], [1], copy_ip(4, (1, 6), (4, 1), (6, 1), so=-2))], None, [(F32, 4), (F32, 6)])
    refused(r"instruction 0 \(COPY\): input has 4 elements, the instruction reads 6",
            [(OP_COPY, [0], [1], copy_ip(4, (6,), (1,), (1,)))], None, [(F32, 4), (F32, 6)])
    # a Loop state of 2 floats written with 8
    refused(r"instruction 0 \(COPY\): output has 2 elements, the instruction writes 8",
            [(OP_COPY, [0], [1], copy_ip(4, (8,), (1,), (1,)))], None, [(F32, 8), (F32, 2)])
    # a negative stride reaching before the start; one reaching exactly to it is fine
    refused("before its start", [(OP_COPY, [0], [1], copy_ip(4, (4,), (-1,), (1,), so=2))], None,
            [(F32, 4), (F32, 4)])
    x, y = np.arange(4, dtype=np.float32), np.zeros(4, np.float32)
    p = program([(OP_COPY, [0], [1], copy_ip(4, (4,), (-1,), (1,), so=3))], None, [(F32, 4), (F32, 4)])
    p.run(*bind(x, y))
    assert y.tolist() == [3, 2, 1, 0]
    # MATMUL operands, the bias and the output by their sizes
    # (B packed: ceil(N / 16) panels of K x 16 floats, 48 for N=12, K=4 stored unpacked)
    refused(r"instruction 0 \(MATMUL\): packed B has 48 elements, the instruction reads 64",
            [(OP_MATMUL, [0, 1, -1], [2], [2, 12, 4])], None, [(F32, 8), (F32, 48), (F32, 24)])
    refused(r"bias has 3 elements, the instruction reads 4",
            [(OP_MATMUL, [0, 1, 2], [3], [2, 4, 3])], None, [(F32, 6), (F32, 48), (F32, 3), (F32, 8)])
    refused(r"instruction 0 \(SOFTMAX\): output has 5 elements, the instruction writes 6",
            [(OP_SOFTMAX, [0], [1], [2, 3, 1, 0])], None, [(F32, 6), (F32, 5)])
    refused(r"instruction 0 \(GATHER\): output has 3 elements, the instruction writes 4",
            [(OP_GATHER, [0, 1], [2], [4, 1, 3, 2, 2])], None, [(F32, 6), (I64, 2), (F32, 3)])
    refused(r"instruction 0 \(REVSEQ\): sequence_lens has 1 elements, the instruction reads 2",
            [(OP_REVSEQ, [0, 1], [2], [4, 3, 2, 1, 1])], None, [(F32, 6), (I64, 1), (F32, 6)])
    refused(r"instruction 0 \(TOPK\): indices has 2 elements, the instruction writes 4",
            [(OP_TOPK, [0], [1, 2], [F32, 2, 3, 1, 2, 1])], None, [(F32, 6), (F32, 4), (I64, 2)])
    refused(r"instruction 0 \(ARGMAX\): output has 1 elements, the instruction writes 2",
            [(OP_ARGMAX, [0], [1], [F32, 2, 3, 1, 0, 0])], None, [(F32, 6), (I64, 1)])
    # a reduction's output walk, and a Pad whose index map points past its input
    refused(r"instruction 0 \(REDUCE\): output has 2 elements, the instruction writes 3",
            [(OP_REDUCE, [0], [1], [0, 1, 3, 1, 2, 3])], None, [(F32, 3), (F32, 2)])
    refused(r"instruction 0 \(TREDUCE\): output has 1 elements, the instruction writes 2",
            [(OP_TREDUCE, [0], [1], [I64, 0, 1, 2, 1, 1, 2])], None, [(I64, 2), (I64, 1)])
    refused(r"instruction 0 \(PAD\): input has 3 elements, the instruction reads 4",
            [(OP_PAD, [0], [1], [4, 1, 5, 1, 6, 0, -1, 0, 1, 3, -1])], None, [(F32, 3), (F32, 5)])
    refused(r"instruction 0 \(PAD\): the index map of axis 0 lies outside the parameters",
            [(OP_PAD, [0], [1], [4, 1, 5, 1, 7, 0, -1, 0, 1, 2, -1])], None, [(F32, 3), (F32, 5)])
    refused(r"index map entry -2 of axis 0 is below -1",
            [(OP_PAD, [0], [1], [4, 1, 2, 1, 6, 0, -2, 0])], None, [(F32, 3), (F32, 2)])


def test_broadcast_strides_checked():
    """Gemm's C read through broadcast strides: (3,) as if it were (2, 4) runs past its end;
    stride 0 (a repeated row) is fine."""
    refused(r"instruction 0 \(BINARY\): input B has 3 elements, the instruction reads 4",
            [(OP_BINARY, [0, 1], [2], [0, 2, 2, 4, 4, 1, 0, 1])], None, [(F32, 8), (F32, 3), (F32, 8)])
    a, b, out = np.ones(8, np.float32), np.arange(4, dtype=np.float32), np.zeros(8, np.float32)
    p = program([(OP_BINARY, [0, 1], [2], [0, 2, 2, 4, 4, 1, 0, 1])], None, [(F32, 8), (F32, 4), (F32, 8)])
    p.run(*bind(a, b, out))
    assert out.tolist() == [1, 2, 3, 4] * 2
    refused(r"instruction 0 \(WHERE\): input Y has 1 elements, the instruction reads 2",
            [(OP_WHERE, [0, 1, 2], [3], [4, 1, 2, 1, 1, 1])], None, [(BOOL, 2), (F32, 2), (F32, 1), (F32, 2)])


def test_scatter_indices_no_wider_than_the_data():
    refused(r"instruction 0 \(SCATTER\): indices are 5 wide on axis 1, the data 3",
            [(OP_SCATTER, [0, 1, 2], [3], [4, 2, 2, 3, 2, 5, 0])], None,
            [(F32, 6), (I64, 10), (F32, 10), (F32, 6)])
    refused(r"axis 2 is outside 0\.\.1", [(OP_SCATTER, [0, 1, 2], [3], [4, 2, 2, 3, 2, 3, 2])], None,
            [(F32, 6), (I64, 6), (F32, 6), (F32, 6)])


def test_negative_sizes_and_unknown_codes():
    # Reshape to [-2, -3] then a Transpose: a copy of negative sizes (an endless walk before)
    refused(r"instruction 0 \(COPY\): the copy has a negative size -2",
            [(OP_COPY, [0], [1], copy_ip(4, (-2, -3), (-3, 1), (1, -2)))], None, [(F32, 6), (F32, 6)])
    refused(r"unknown function 30", [(OP_UNARY, [0], [1], [30, 2], [0, 0])], None, [(F32, 2), (F32, 2)])
    refused(r"instruction 0 \(unknown op\): unknown op 99", [(99, [0], [1], [])], None, [(F32, 2), (F32, 2)])
    refused(r"k = 4 is outside \[0, 3\]", [(OP_TOPK, [0], [1, 2], [F32, 1, 3, 1, 4, 1])], None,
            [(F32, 3), (F32, 4), (I64, 4)])
    refused(r"stride 0, dilation 1 and group 1 must be >= 1",
            [(OP_CONV1D, [0, 1, -1], [2], [1, 2, 5, 3, 2, 4, 0, 1, 0, 1])], None,
            [(F32, 10), (F32, 12), (F32, 12)], work=64)
    refused(r"element count -1 of the mean is out of range",  # int32 mean dividing by (int32)-1
            [(OP_TREDUCE, [0], [1], [I32, 1, 1, 2, 0, 1, -1])], None, [(I32, 2), (I32, 1)])


def test_sizes_whose_products_overflow():
    big = 1 << 40
    refused(r"the sizes of the copy overflow",
            [(OP_COPY, [0], [1], copy_ip(4, (big, big), (0, 0), (0, 0)))], None, [(F32, 1), (F32, 1)])
    refused(r"input: stride 4611686018427387904 over 4 elements overflows",
            [(OP_COPY, [0], [1], copy_ip(4, (4,), (1 << 62,), (1,)))], None, [(F32, 4), (F32, 4)])
    refused(r"offset .* is out of range",
            [(OP_COPY, [0], [1], copy_ip(4, (1,), (1,), (1,), so=-(1 << 63)))], None, [(F32, 4), (F32, 4)])
    refused(r"the sizes of the product overflow", [(OP_MATMUL, [0, 1, -1], [2], [big, big, big])], None,
            [(F32, 1), (F32, 1), (F32, 1)])
    refused(r"sizes beyond what BLAS takes", [(OP_MATMUL, [0, 1, -1], [2], [1 << 31, 1, 1])], None,
            [(F32, 1), (F32, 1), (F32, 1)])
    refused(r"the sizes of the data overflow", [(OP_GATHER, [0, 1], [2], [4, big, big, big, 1])], None,
            [(F32, 1), (I64, 1), (F32, 1)])
    refused(r"instruction 0 \(COPY\): input is tensor 0 of -5 elements",
            [(OP_COPY, [0], [1], copy_ip(4, (1,), (1,), (1,)))], None, [(F32, -5), (F32, 1)])
    program([], None, [(F32, -5)])  # an entry no instruction names is never used


def lstm_stack(I=3, H=2):
    r = np.random.default_rng(1)
    layer = rnnengine.LSTM(r.standard_normal((1, 8, I)).astype(np.float32),
                           r.standard_normal((1, 8, H)).astype(np.float32))
    return _core.Stack([layer._spec()])


def gru_stack(I=3, H=2):
    r = np.random.default_rng(2)
    layer = rnnengine.GRU(r.standard_normal((1, 6, I)).astype(np.float32),
                          r.standard_normal((1, 6, H)).astype(np.float32))
    return _core.Stack([layer._spec()])


def test_recurrent_sizes_against_the_stack():
    """T=2, B=1, I=3, H=2 LSTM: X 6 floats, Y 4, state D*B*H*(1+has_c) = 4, Y_h/Y_c 2."""
    stack = lstm_stack()
    T, B, I, H = 2, 1, 3, 2
    ip = [T, B, 0, 1, H, 1, 4, 0, -1]
    work = stack.workspace_size(T, B)
    table = [(F32, 6), (F32, 4), (F32, 2), (F32, 2), (F32, 4), (I32, 1)]
    run = (OP_RECURRENT, [0, -1, -1, -1], [1, 2, 3], ip, [], 0)
    p = program([run], None, table, stacks=[stack], work=work)
    x, y, yh, yc, state = np.ones(6, np.float32), *(np.zeros(n, np.float32) for n in (4, 2, 2, 4))
    p.run(*bind(x, y, yh, yc, state, np.zeros(1, np.int32), work=work))
    assert np.all(y != 0) and np.array_equal(yh, y[2:])
    refused(r"instruction 0 \(RECURRENT\): state has 3 elements, the instruction uses 4",
            [run], None, [(F32, 6), (F32, 4), (F32, 2), (F32, 2), (F32, 3)], stacks=[stack], work=work)
    refused(r"X has 5 elements, the instruction reads 6",
            [run], None, [(F32, 5)] + table[1:], stacks=[stack], work=work)
    refused(r"Y has 3 elements, the instruction writes 4",
            [run], None, [(F32, 6), (F32, 3)] + table[2:], stacks=[stack], work=work)
    refused(r"D 1, H 2, has_c 0, the stack has 1 layer\(s\) of D 1, H 2, has_c 1",
            [(OP_RECURRENT, [0, -1, -1, -1], [1, 2, 3], [1, 2, 0, 1, H, 0, 4, 0, -1], [], 0)], None, table,
            stacks=[stack], work=work)
    refused(r"D 1, H 3, has_c 1, the stack has 1 layer\(s\) of D 1, H 2, has_c 1",
            [(OP_RECURRENT, [0, -1, -1, -1], [1, 2, 3], [T, B, 0, 1, 3, 1, 4, 0, -1], [], 0)], None, table,
            stacks=[stack], work=work)
    refused(r"sequence_lens is float32, the instruction takes int32",
            [(OP_RECURRENT, [0, 6, -1, -1], [1, 2, 3], ip, [], 0)], None, table + [(F32, 1)], stacks=[stack],
            work=work)
    refused(r"initial_h has 1 elements, the instruction reads 2",
            [(OP_RECURRENT, [0, -1, 5, -1], [1, 2, 3], ip[:7] + [2, -1], [], 0)], None, table[:5] + [(F32, 1)],
            stacks=[stack], work=work)
    refused(r"needs \d+ floats of workspace, the program has 16", [run], None, table, stacks=[stack], work=16)
    # D and H swapped for a D * H of the same size: the stack would write Y with its own
    # (found by mutating corpus plans under AddressSanitizer)
    r = np.random.default_rng(4)
    bidir = _core.Stack([rnnengine.LSTM(r.standard_normal((2, 8, I)).astype(np.float32),
                                        r.standard_normal((2, 8, H)).astype(np.float32),
                                        direction="bidirectional")._spec()])
    refused(r"D 1, H 4, has_c 1, the stack has 1 layer\(s\) of D 2, H 2, has_c 1",
            [(OP_RECURRENT, [0, -1, -1, -1], [1, 2, 3], [T, B, 0, 1, 4, 1, 4, 0, -1], [], 0)], None,
            [(F32, 6), (F32, 8), (F32, 4), (F32, 4), (F32, 8)], stacks=[bidir], work=bidir.workspace_size(T, B))
    refused(r"initial_c or Y_c given to a layer without a cell state",
            [(OP_RECURRENT, [0, -1, -1, -1], [1, 2, 3], [T, B, 0, 1, H, 0, 4, 0, -1], [], 0)], None, table,
            stacks=[gru_stack()], work=work)


def test_workspace_of_conv_and_topk():
    refused(r"instruction 0 \(CONV1D\): needs 16 floats of workspace, the program has 15",
            [(OP_CONV1D, [0, 1, -1], [2], [1, 2, 5, 3, 2, 4, 1, 1, 0, 1])], None,
            [(F32, 10), (F32, 12), (F32, 12)], work=15)
    refused(r"instruction 0 \(TOPK\): needs 40 floats of workspace, the program has 16",
            [(OP_TOPK, [0], [1, 2], [F32, 1, 20, 1, 2, 1])], None, [(F32, 20), (F32, 2), (I64, 2)])


def test_packed_conv_filters_workspace_and_activation_checked():
    # N 1, C 2, L 5, M 3, K 2 -> Lout 4: one panel of 16 filters x (2*2) taps = 64 floats of
    # packed filters; workspace 4 positions x (4 taps + 16 lanes) = 80 floats (src_c/conv.c)
    geo = [1, 2, 5, 3, 2, 4, 1, 1, 0, 1]
    table = [(F32, 10), (F32, 64), (F32, 3), (F32, 12)]
    ok = program([(OP_CONV1D_PACKED, [0, 1, 2], [3], geo + [-1], [0.0])], None, table, work=80)
    x, wp, b, y = (np.arange(10, dtype=np.float32), np.zeros(64, np.float32), np.array([1, 2, -3], np.float32),
                   np.zeros(12, np.float32))
    ok.run(np.array([_core.address(a) for a in (x, wp, b, y)], np.int64), np.zeros(80, np.float32))
    assert y.tolist() == [1] * 4 + [2] * 4 + [-3] * 4  # zero filters: the bias
    refused(r"instruction 0 \(CONV1D_PACKED\): packed filters has 63 elements, the instruction reads 64",
            [(OP_CONV1D_PACKED, [0, 1, 2], [3], geo + [-1], [0.0])], None, [table[0], (F32, 63)] + table[2:], work=80)
    refused(r"needs 80 floats of workspace, the program has 79",
            [(OP_CONV1D_PACKED, [0, 1, 2], [3], geo + [-1], [0.0])], None, table, work=79)
    refused(r"fused activation 2 is not -1 \(none\), Relu or LeakyRelu",
            [(OP_CONV1D_PACKED, [0, 1, 2], [3], geo + [2], [0.0])], None, table, work=80)
    refused(r"has 0 float parameters, the op reads 1",
            [(OP_CONV1D_PACKED, [0, 1, 2], [3], geo + [-1], [])], None, table, work=80)
    refused(r"has 10 int parameters, the op reads 11",
            [(OP_CONV1D_PACKED, [0, 1, 2], [3], geo, [0.0])], None, table, work=80)
    refused(r"output has 11 elements, the instruction writes 12",
            [(OP_CONV1D_PACKED, [0, 1, 2], [3], geo + [-1], [0.0])], None, table[:3] + [(F32, 11)], work=80)
    refused(r"group 2 does not divide 2 channels and 3 filters",
            [(OP_CONV1D_PACKED, [0, 1, 2], [3], geo[:9] + [2, -1], [0.0])], None, table, work=80)
    # float parameters stay refused on the other ops
    refused(r"instruction 0 \(CONV1D\): has 1 float parameters, the op reads none",
            [(OP_CONV1D, [0, 1, 2], [3], geo, [0.0])], None, [table[0], (F32, 12)] + table[2:], work=80)


def test_no_op_but_copy_computes_in_place():
    """An output that is also an input (or another output) is refused, except by COPY, which
    may copy a stream state onto itself (found by mutating corpus plans under AddressSanitizer:
    memcpy with overlapping buffers)."""
    refused(r"instruction 0 \(BINARY\): output 0 is input 1 \(tensor 1\): the op does not compute in place",
            [(OP_BINARY, [0, 1], [1], [0, 1, 2, 1, 1])], None, [(F32, 2), (F32, 2)])
    refused(r"instruction 0 \(TOPK\): outputs 0 and 1 are both tensor 1",
            [(OP_TOPK, [0], [1, 1], [I64, 1, 3, 1, 2, 1])], None, [(I64, 3), (I64, 2)])
    x = np.arange(4, dtype=np.float32)
    p = program([(OP_COPY, [0], [0], copy_ip(4, (4,), (1,), (1,)))], None, [(F32, 4)])
    p.run(*bind(x))
    assert x.tolist() == [0, 1, 2, 3]


def test_recurrent_started_flags():
    """A stream's sequence_lens flags (ip[8]): B float32s the op reads and writes, apart from
    every operand and the state; a row at length 0 gives its state only once it has had a step."""
    stack = lstm_stack()
    T, B, I, H = 2, 2, 3, 2
    work = stack.workspace_size(T, B)
    # 0 X, 1 Y, 2 Y_h, 3 Y_c, 4 state, 5 lens, 6 flags
    table = [(F32, T * B * I), (F32, T * B * H), (F32, B * H), (F32, B * H), (F32, 2 * B * H), (I32, B), (F32, B)]
    ip = [T, B, 0, 1, H, 1, 4, 1, 6]
    run = (OP_RECURRENT, [0, 5, -1, -1], [1, 2, 3], ip, [], 0)
    p = program([run], None, table, stacks=[stack], work=work)
    state0 = np.arange(1, 2 * B * H + 1, dtype=np.float32)  # a stream's carried state: nonzero
    x, y, yh, yc = np.ones(T * B * I, np.float32), *(np.zeros(n, np.float32) for n in (T * B * H, B * H, B * H))
    for flags, lens, want_row1 in (([0, 0], [2, 0], "zero"), ([1, 1], [2, 0], "state"), ([0, 0], [0, 0], "zero")):
        state, fl = state0.copy(), np.array(flags, np.float32)
        p.run(*bind(x, y, yh, yc, state, np.array(lens, np.int32), fl, work=work))
        h_row1 = yh.reshape(B, H)[1]
        if want_row1 == "zero":  # never had a step: an empty sequence's final state
            assert np.all(h_row1 == 0), (flags, lens, h_row1)
        else:  # ended in an earlier call: its state, carried on unchanged
            assert np.array_equal(h_row1, state0[H:2 * H]), (flags, lens, h_row1)
        assert np.array_equal(state.reshape(2, B, H)[:, 1], state0.reshape(2, B, H)[:, 1])  # length 0: untouched
        assert fl.tolist() == [1.0 if lens[0] > 0 or flags[0] else 0.0, float(flags[1])]
    refused(r"started flags without sequence_lens", [(OP_RECURRENT, [0, -1, -1, -1], [1, 2, 3], ip, [], 0)],
            None, table, stacks=[stack], work=work)
    refused(r"started flags are int32, the instruction takes float32", [run], None, table[:6] + [(I32, B)],
            stacks=[stack], work=work)
    refused(r"started flags have 1 elements, the instruction uses 2", [run], None, table[:6] + [(F32, 1)],
            stacks=[stack], work=work)
    refused(r"started flags are the state tensor 4", [(OP_RECURRENT, [0, 5, -1, -1], [1, 2, 3], ip[:8] + [4], [], 0)],
            None, table, stacks=[stack], work=work)
    refused(r"started flags are operand 4 \(tensor 1\)",
            [(OP_RECURRENT, [0, 5, -1, -1], [1, 2, 3], ip[:8] + [1], [], 0)], None, table, stacks=[stack], work=work)
    refused(r"started flags name tensor 9, the program has tensors 0..6",
            [(OP_RECURRENT, [0, 5, -1, -1], [1, 2, 3], ip[:8] + [9], [], 0)], None, table, stacks=[stack], work=work)
    refused(r"started flags are tensor 6, a constant or input the program must not write", [run], None, table,
            stacks=[stack], work=work, tensor_writable=[1] * 6 + [0])


def test_constants_and_inputs_are_never_written():
    """Constants may be a read-only mapped weight file and inputs are the caller's arrays: an
    instruction or a recurrent state that writes one is refused."""
    copy = (OP_COPY, [0], [1], copy_ip(4, (2,), (1,), (1,)))
    program([copy], None, [(F32, 2), (F32, 2)], tensor_writable=[0, 1])
    refused(r"instruction 0 \(COPY\): output is tensor 1, a constant or input the program must not write",
            [copy], None, [(F32, 2), (F32, 2)], tensor_writable=[1, 0])
    stack = lstm_stack()
    run = (OP_RECURRENT, [0, -1, -1, -1], [1, 2, 3], [2, 1, 0, 1, 2, 1, 4, 1, -1], [], 0)
    refused(r"instruction 0 \(RECURRENT\): state is tensor 4, a constant or input the program must not write",
            [run], None, [(F32, 6), (F32, 4), (F32, 2), (F32, 2), (F32, 4)], stacks=[stack],
            work=stack.workspace_size(2, 1), tensor_writable=[0, 1, 1, 1, 0])


def test_the_message_names_the_node_and_run_checks_its_bindings():
    msg = refused(r"^Gemm node 'g': instruction 1 \(MATMUL\): packed B has 48 elements, the instruction reads 64$",
                  [(OP_COPY, [0], [1], copy_ip(4, (8,), (1,), (1,))), (OP_MATMUL, [1, 2, -1], [3], [2, 12, 4])],
                  None, [(F32, 8), (F32, 8), (F32, 48), (F32, 24)],
                  labels=["Transpose node 't'", "Gemm node 'g'"])
    assert "Transpose" not in msg
    p = program([(OP_COPY, [0], [1], copy_ip(4, (2,), (1,), (1,)))], None, [(F32, 2), (F32, 2)], work=32)
    a = np.ones(2, np.float32)
    with pytest.raises(ValueError, match="ptrs has 1 entries, the program has 2 tensors"):
        p.run(np.array([_core.address(a)], np.int64), np.zeros(32, np.float32))
    with pytest.raises(ValueError, match="work has 16 floats, the program needs 32"):
        p.run(*bind(a, a))


# --- values that are data stay checked when the program runs -------------------------------------

def test_run_time_checks_of_index_values():
    """Scatter indices against the data's axis (also negative ones), Gather indices, ReverseSequence
    and recurrent lengths: checked at every run, refused with GraphRunError naming the value."""
    data, upd, out = np.arange(6, dtype=np.float32), np.full(2, 9, np.float32), np.zeros(6, np.float32)
    sc = program([(OP_SCATTER, [0, 1, 2], [3], [4, 2, 2, 3, 1, 2, 1])], None,
                 [(F32, 6), (I64, 2), (F32, 2), (F32, 6)])
    for bad in ([0, 3], [-4, 0]):
        with pytest.raises(_core.GraphRunError, match=f"ScatterElements: index {bad[0] if bad[0] < 0 else bad[1]} "
                                                      r"is outside \[-3, 3\)"):
            sc.run(*bind(data, np.array(bad, np.int64), upd, out))
    sc.run(*bind(data, np.array([-3, 2], np.int64), upd, out))
    assert out.tolist() == [9, 1, 9, 3, 4, 5]
    ga = program([(OP_GATHER, [0, 1], [2], [4, 1, 6, 1, 1])], None, [(F32, 6), (I64, 1), (F32, 1)])
    for bad in (6, -7):
        with pytest.raises(_core.GraphRunError, match=f"Gather: index {bad} at position 0"):
            ga.run(*bind(data, np.array([bad], np.int64), out))
    rv = program([(OP_REVSEQ, [0, 1], [2], [4, 3, 2, 1, 1])], None, [(F32, 6), (I64, 2), (F32, 6)])
    for bad in ([4, 0], [0, -1]):
        with pytest.raises(_core.GraphRunError, match="sequence_lens"):
            rv.run(*bind(data, np.array(bad, np.int64), out))
    stack = lstm_stack()
    w = stack.workspace_size(2, 1)
    rec = program([(OP_RECURRENT, [0, 5, -1, -1], [1, 2, 3], [2, 1, 0, 1, 2, 1, 4, 0, -1], [], 0)], None,
                  [(F32, 6), (F32, 4), (F32, 2), (F32, 2), (F32, 4), (I32, 1)], stacks=[stack], work=w)
    bufs = [np.ones(6, np.float32), np.zeros(4, np.float32), np.zeros(2, np.float32), np.zeros(2, np.float32),
            np.zeros(4, np.float32)]
    with pytest.raises(_core.GraphRunError, match=r"sequence_lens\[0\] = 3 lies outside \[0, T = 2\]"):
        rec.run(*bind(*bufs, np.array([3], np.int32), work=w))


# --- the span check is exact: accepted iff every element walked lies inside -----------------------

@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=0, max_size=4), st.data())
def test_copy_spans_accepted_exactly_when_inside(shape, data):
    nd = len(shape)
    ss = data.draw(st.lists(st.integers(-6, 6), min_size=nd, max_size=nd))
    off = data.draw(st.integers(-10, 30))
    count = data.draw(st.integers(0, 40))
    total = int(np.prod(shape)) if nd else 1
    # every source offset the walk visits, by brute force
    offs = [off + sum(i * s for i, s in zip(idx, ss)) for idx in np.ndindex(*shape)] if total else []
    inside = all(0 <= o < count for o in offs)
    table = [(F32, count), (F32, max(total, 1))]
    ip = copy_ip(4, shape, ss, [int(s) for s in np.cumprod([1] + shape[::-1])[:-1][::-1]] if nd else [], so=off)
    if inside:
        p = program([(OP_COPY, [0], [1], ip)], None, table)
        src, dst = np.arange(max(count, 1), dtype=np.float32), np.zeros(max(total, 1), np.float32)
        p.run(*bind(src, dst))
        if total:
            np.testing.assert_array_equal(dst[:total], src[np.array(offs)])
    else:
        with pytest.raises(_core.ProgramError, match=r"instruction 0 \(COPY\): input"):
            program([(OP_COPY, [0], [1], ip)], None, table)


# --- no false refusals: every program the planner makes for the corpus passes ---------------------

CORPUS = os.path.join(os.path.dirname(__file__), "data", "corpus")
MANIFEST = os.path.join(CORPUS, "manifest.json")
ENTRIES = json.load(open(MANIFEST))["models"] if os.path.exists(MANIFEST) else []


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.get("convert", {}).get("expect") != "refuse"],
                         ids=lambda e: e["file"].rsplit(".", 1)[0])
def test_every_corpus_plan_passes_the_verifier(entry, monkeypatch):
    """Whole-sequence and streamed plans (chunks of 1 and 3 steps) of every corpus model are
    verified when made; each is rebuilt from its own arrays and verified again, and refused
    once its largest written tensor is said to hold nothing (the table is what is checked)."""
    from test_corpus import dims_of
    from rnnengine.verify import verify
    plans = []
    orig = graph.Plan.__init__

    def record(self, planner):
        orig(self, planner)
        plans.append(self)
    monkeypatch.setattr(graph.Plan, "__init__", record)
    path = os.path.join(CORPUS, entry["file"])
    verify(rnnengine.convert(path), path, dims_of(entry), seed=2, chunks=(1, 3), calls=2)
    assert plans
    for plan in plans:
        prog = plan.program
        if prog.program.shape[0] == 0:
            continue
        args = (prog.program, prog.iparams, prog.fparams, prog.stacks, prog.labels)
        _core.Program(*args, tensor_dtypes=prog.tensor_dtypes, tensor_counts=prog.tensor_counts,
                      work_floats=prog.work_floats, tensor_writable=prog.tensor_writable)
        assert prog.tensor_writable.sum() < len(prog.tensor_writable)  # constants / inputs marked
        outs = {int(t) for t in prog.program[:, 5:8].reshape(-1) if t >= 0}
        biggest = max(outs, key=lambda t: prog.tensor_counts[t])
        counts = prog.tensor_counts.copy()
        counts[biggest] = 0  # (not one short: a stream's conv context is written only in part per call)
        with pytest.raises(_core.ProgramError, match="instruction"):
            _core.Program(*args, tensor_dtypes=prog.tensor_dtypes, tensor_counts=counts,
                          work_floats=prog.work_floats)
