# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# _core.pyx - thin binding over the C core: validate, then release the GIL around compute.
"""Low-level binding. Use the classes in :mod:`rnnengine` rather than this module."""

from cpython.pycapsule cimport PyCapsule_GetName, PyCapsule_GetPointer
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint16_t, uintptr_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy

import threading

import numpy as np
cimport numpy as cnp
from rnnengine.errors import EngineError, GraphRunError, ProgramError  # noqa: F401 (re-exported)
# the tables shared with C, defined once (tensor_code re-exported for the planner's callers)
from rnnengine.codes import CELL_KINDS, DIRECTIONS, GATES, WEIGHT_DTYPES, tensor_code  # noqa: F401

cnp.import_array()

# --- BLAS: SciPy's sgemm and sgemv, taken from scipy.linalg.cython_blas at import (as scikit-learn does),
# so the package needs no BLAS at build time.
def _cython_blas():
    """scipy.linalg.cython_blas without importing scipy.linalg: that package's import pulls in
    numpy.testing and numpy.f2py (0.3-0.4 s of every process start on the benchmark machine;
    the module alone: ~35 ms). It is loaded from its file as the import system loads it, then
    taken out of sys.modules again, so that a later ``import scipy.linalg.cython_blas`` goes
    through the import system as usual: it gets this same module (CPython keeps extension
    modules loaded) and sets it on scipy.linalg. Already imported, or not where a SciPy wheel
    keeps it: the plain import."""
    import sys
    name = "scipy.linalg.cython_blas"
    mod = sys.modules.get(name)
    if mod is not None:
        return mod
    try:
        import importlib.machinery
        import importlib.util
        import os
        spec = importlib.util.find_spec("scipy")  # finds the package without importing it
        folder = os.path.join(list(spec.submodule_search_locations)[0], "linalg")
        path = next(p for p in (os.path.join(folder, "cython_blas" + s)
                                for s in importlib.machinery.EXTENSION_SUFFIXES) if os.path.isfile(p))
        loader = importlib.machinery.ExtensionFileLoader(name, path)
        mod = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path, loader=loader))
        loader.exec_module(mod)
        mod.__pyx_capi__["sgemm"], mod.__pyx_capi__["sgemv"]
    except Exception:
        mod = None
    finally:
        if sys.modules.get(name) is not None and sys.modules.get(name) is mod:
            del sys.modules[name]
    if mod is None:
        from scipy.linalg import cython_blas
        mod = cython_blas
    return mod


_blas_module = None  # kept: the capsules' functions live in its shared library


def _install_blas():
    global _blas_module
    cython_blas = _blas_module = _cython_blas()
    capsule = cython_blas.__pyx_capi__["sgemm"]
    rnn_blas_set_sgemm(<rnn_sgemm_fn>PyCapsule_GetPointer(capsule, PyCapsule_GetName(capsule)))
    capsule = cython_blas.__pyx_capi__["sgemv"]
    rnn_blas_set_sgemv(<rnn_sgemv_fn>PyCapsule_GetPointer(capsule, PyCapsule_GetName(capsule)))


_install_blas()
rnn_kernel_level()  # resolve the CPU dispatch once, at import


def kernel_level(level=None):
    """The compute kernels in use: 2 = AVX-512F (float32 products; the rest AVX2), 1 = AVX2+FMA,
    0 = portable reference. Passing a level
    switches process-wide (tests and benchmarks only; never while streams are running).
    Returns the level in force."""
    if level is not None:
        rnn_set_kernel_level(int(level))
    return rnn_kernel_level()


def panel_width():
    """Columns per packed panel (src_c/pack.c): the layout the panel cache stores."""
    return rnn_panel_width()


def conv_parts(int64_t CK, int64_t Lout):
    """Partial sums RNN_OP_CONV1D_PACKED adds per output for a call of Lout positions of a
    conv of CK taps (src_c/conv.c rnn_conv1d_parts): 1 or 4; the packing follows it."""
    return rnn_conv1d_parts(CK, Lout)


def conv_pack(const float[:, :, ::1] W, int64_t group, int64_t parts, float[::1] out):
    """Writes conv filters W (M, C/group, K) into `out` in the packed layout of
    RNN_OP_CONV1D_PACKED for sums in `parts` parts (src_c/conv.c, rnn_conv1d_pack):
    rnn_conv1d_packed_floats floats."""
    cdef int64_t M = W.shape[0], Cg = W.shape[1], K = W.shape[2]
    if group <= 0 or M % group != 0:
        raise ValueError(f"conv_pack: {M} filters do not split into {group} groups")
    if parts != 1 and parts != 4:
        raise ValueError(f"conv_pack: {parts} parts (1 or 4)")
    if out.shape[0] != rnn_conv1d_packed_floats(M, Cg, K, group):
        raise ValueError(f"conv_pack: out has {out.shape[0]} floats, the layout takes "
                         f"{rnn_conv1d_packed_floats(M, Cg, K, group)}")
    if M * Cg * K == 0:
        return
    with nogil:
        rnn_conv1d_pack(&W[0, 0, 0], M, Cg, K, group, parts, &out[0])


def conv_work(int64_t N, int64_t Lout, int64_t Cg, int64_t K, int64_t Mg):
    """Workspace floats of RNN_OP_CONV1D_PACKED (src_c/conv.c rnn_conv1d_packed_work)."""
    if min(N, Lout, Cg, K, Mg) < 0 or max(N, Lout, Cg, K, Mg) > (1 << 40):
        raise ValueError("conv_work: sizes out of range")
    return rnn_conv1d_packed_work(N, Lout, Cg, K, Mg)


def stft_sizes(int64_t K):
    """(table floats, workspace floats) of RNN_OP_STFT for frames of K samples (src_c/stft.c)."""
    return rnn_stft_table_floats(K), rnn_stft_work(K)


def kernel_level_max():
    return rnn_kernel_level_max()

# Every constant of src_c/rnnengine.h under its C name, its value given by the C compiler (not
# copied): tests/test_constants.py checks rnnengine.codes against it and against the header.
C_CONSTANTS = {
    "RNN_STATUS_OK": RNN_STATUS_OK, "RNN_STATUS_BAD_ARGUMENT": RNN_STATUS_BAD_ARGUMENT,
    "RNN_STATUS_BAD_SHAPE": RNN_STATUS_BAD_SHAPE, "RNN_STATUS_OUT_OF_MEMORY": RNN_STATUS_OUT_OF_MEMORY,
    "RNN_STATUS_TOO_LARGE": RNN_STATUS_TOO_LARGE, "RNN_CELL_RNN": RNN_CELL_RNN, "RNN_CELL_GRU": RNN_CELL_GRU,
    "RNN_CELL_LSTM": RNN_CELL_LSTM, "RNN_DIR_FORWARD": RNN_DIR_FORWARD, "RNN_DIR_REVERSE": RNN_DIR_REVERSE,
    "RNN_DIR_BIDIRECTIONAL": RNN_DIR_BIDIRECTIONAL, "RNN_WEIGHTS_F32": RNN_WEIGHTS_F32,
    "RNN_WEIGHTS_F16": RNN_WEIGHTS_F16, "RNN_WEIGHTS_I8": RNN_WEIGHTS_I8, "RNN_ACT_RELU": RNN_ACT_RELU,
    "RNN_ACT_TANH": RNN_ACT_TANH, "RNN_ACT_SIGMOID": RNN_ACT_SIGMOID, "RNN_ACT_AFFINE": RNN_ACT_AFFINE,
    "RNN_ACT_LEAKY_RELU": RNN_ACT_LEAKY_RELU, "RNN_ACT_THRESHOLDED_RELU": RNN_ACT_THRESHOLDED_RELU,
    "RNN_ACT_SCALED_TANH": RNN_ACT_SCALED_TANH, "RNN_ACT_HARD_SIGMOID": RNN_ACT_HARD_SIGMOID,
    "RNN_ACT_ELU": RNN_ACT_ELU, "RNN_ACT_SOFTSIGN": RNN_ACT_SOFTSIGN, "RNN_ACT_SOFTPLUS": RNN_ACT_SOFTPLUS,
    "RNN_ACT_COUNT": RNN_ACT_COUNT, "RNN_OP_COPY": RNN_OP_COPY, "RNN_OP_BINARY": RNN_OP_BINARY,
    "RNN_OP_UNARY": RNN_OP_UNARY, "RNN_OP_MATMUL": RNN_OP_MATMUL, "RNN_OP_SOFTMAX": RNN_OP_SOFTMAX,
    "RNN_OP_GATHER": RNN_OP_GATHER, "RNN_OP_CONV1D": RNN_OP_CONV1D, "RNN_OP_PAD": RNN_OP_PAD,
    "RNN_OP_REDUCE": RNN_OP_REDUCE, "RNN_OP_CAST": RNN_OP_CAST, "RNN_OP_RECURRENT": RNN_OP_RECURRENT,
    "RNN_OP_TOPK": RNN_OP_TOPK, "RNN_OP_SCATTER": RNN_OP_SCATTER, "RNN_OP_TBINARY": RNN_OP_TBINARY,
    "RNN_OP_TUNARY": RNN_OP_TUNARY, "RNN_OP_WHERE": RNN_OP_WHERE, "RNN_OP_TREDUCE": RNN_OP_TREDUCE,
    "RNN_OP_ARGMAX": RNN_OP_ARGMAX, "RNN_OP_CUMSUM": RNN_OP_CUMSUM, "RNN_OP_REVSEQ": RNN_OP_REVSEQ,
    "RNN_OP_CONV1D_PACKED": RNN_OP_CONV1D_PACKED, "RNN_OP_STFT": RNN_OP_STFT,
    "RNN_OP_LAYERNORM": RNN_OP_LAYERNORM, "RNN_OP_POOL1D": RNN_OP_POOL1D,
    "RNN_OP_BMATMUL": RNN_OP_BMATMUL,
    "RNN_BATCH_OK": RNN_BATCH_OK, "RNN_BATCH_CLOSED": RNN_BATCH_CLOSED, "RNN_BATCH_TIMEOUT": RNN_BATCH_TIMEOUT,
    "RNN_BATCH_FULL": RNN_BATCH_FULL, "RNN_BATCH_BAD_SLOT": RNN_BATCH_BAD_SLOT, "RNN_BATCH_FAILED": RNN_BATCH_FAILED,
    "RNN_BATCH_MAX_SLOTS": RNN_BATCH_MAX_SLOTS,
    "RNN_BIN_ADD": RNN_BIN_ADD, "RNN_BIN_SUB": RNN_BIN_SUB, "RNN_BIN_MUL": RNN_BIN_MUL,
    "RNN_BIN_DIV": RNN_BIN_DIV, "RNN_BIN_POW": RNN_BIN_POW, "RNN_BIN_MAX": RNN_BIN_MAX,
    "RNN_BIN_MIN": RNN_BIN_MIN, "RNN_BIN_MOD": RNN_BIN_MOD, "RNN_BIN_FMOD": RNN_BIN_FMOD,
    "RNN_BIN_EQUAL": RNN_BIN_EQUAL, "RNN_BIN_LESS": RNN_BIN_LESS, "RNN_BIN_LESS_EQUAL": RNN_BIN_LESS_EQUAL,
    "RNN_BIN_GREATER": RNN_BIN_GREATER, "RNN_BIN_GREATER_EQUAL": RNN_BIN_GREATER_EQUAL,
    "RNN_BIN_AND": RNN_BIN_AND, "RNN_BIN_OR": RNN_BIN_OR, "RNN_BIN_XOR": RNN_BIN_XOR,
    "RNN_UNARY_SQRT": RNN_UNARY_SQRT, "RNN_UNARY_EXP": RNN_UNARY_EXP, "RNN_UNARY_LOG": RNN_UNARY_LOG,
    "RNN_UNARY_NEG": RNN_UNARY_NEG, "RNN_UNARY_ABS": RNN_UNARY_ABS, "RNN_UNARY_CLIP": RNN_UNARY_CLIP,
    "RNN_UNARY_RECIPROCAL": RNN_UNARY_RECIPROCAL, "RNN_UNARY_ERF": RNN_UNARY_ERF,
    "RNN_UNARY_FLOOR": RNN_UNARY_FLOOR, "RNN_UNARY_CEIL": RNN_UNARY_CEIL, "RNN_TUNARY_NEG": RNN_TUNARY_NEG,
    "RNN_TUNARY_ABS": RNN_TUNARY_ABS, "RNN_TUNARY_NOT": RNN_TUNARY_NOT, "RNN_REDUCE_SUM": RNN_REDUCE_SUM,
    "RNN_REDUCE_MEAN": RNN_REDUCE_MEAN, "RNN_REDUCE_MAX": RNN_REDUCE_MAX, "RNN_REDUCE_MIN": RNN_REDUCE_MIN,
    "RNN_REDUCE_PROD": RNN_REDUCE_PROD, "RNN_DT_F32": RNN_DT_F32, "RNN_DT_I64": RNN_DT_I64,
    "RNN_DT_I32": RNN_DT_I32, "RNN_DT_U8": RNN_DT_U8, "RNN_DT_BOOL": RNN_DT_BOOL,
    "RNN_DT_OTHER": RNN_DT_OTHER, "RNN_INSTR_WORDS": RNN_INSTR_WORDS,
}


cdef int _check(rnn_status status, what) except -1:
    if status != RNN_STATUS_OK:
        if status == RNN_STATUS_OUT_OF_MEMORY:
            raise MemoryError(f"{what}: out of memory")
        raise EngineError(f"{what}: {rnn_status_string(status).decode()}")
    return 0


def blas_available():
    """True when the C core calls SciPy's BLAS (False: naive reference GEMM)."""
    return bool(rnn_blas_has_sgemm())


def gemm_nt(float[:, ::1] A, float[:, ::1] B, bint use_blas=True):
    """C = A @ B.T through the core's GEMM (BLAS or the naive reference); for tests."""
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"gemm_nt: A has {A.shape[1]} columns, B has {B.shape[1]}")
    out = np.zeros((A.shape[0], B.shape[0]), dtype=np.float32)
    cdef float[:, ::1] C = out
    cdef int64_t M = A.shape[0], N = B.shape[0], K = A.shape[1]
    if M and N:
        with nogil:
            rnn_gemm_nt(M, N, K, 1.0, &A[0, 0] if K else NULL, K, &B[0, 0] if K else NULL, K,
                        0.0, &C[0, 0], N, use_blas)
    return out


def gemm_packed(const float[:, ::1] A, const float[:, ::1] B, C=None, bint reference=False, dtype="float32"):
    """C (+)= A @ B.T with B packed into panels (stored as float32, float16 or int8), through
    the dispatched kernel or the plain reference; for tests."""
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"gemm_packed: A has {A.shape[1]} columns, B has {B.shape[1]}")
    cdef int64_t M = A.shape[0], N = B.shape[0], K = A.shape[1]
    cdef int accumulate = C is not None
    out = np.zeros((M, N), np.float32) if C is None else C
    cdef float[:, ::1] Cv = out
    cdef rnn_packed p
    _check(rnn_packed_init_dtype(&p, &B[0, 0], N, K, K, WEIGHT_DTYPES[dtype]), "packing")
    with nogil:
        if reference:
            rnn_gemm_packed_ref(M, &A[0, 0], K, &p, &Cv[0, 0], N, accumulate)
        else:
            rnn_gemm_packed(M, &A[0, 0], K, &p, &Cv[0, 0], N, accumulate)
    rnn_packed_free(&p)
    return out


def lstmp_step_reference(const float[::1] x, const float[:, ::1] W, const float[:, ::1] R, B,
                         const float[:, ::1] Whr, float[::1] h, float[::1] c):
    """One step of one row of the naive projected-LSTM reference (rnn_lstmp_step_ref in
    src_c/lstm.c), h (P) and c (H) updated in place; for tests."""
    cdef int64_t H = c.shape[0], P = h.shape[0], I = x.shape[0]
    if W.shape[0] != 4 * H or W.shape[1] != I or R.shape[0] != 4 * H or R.shape[1] != P \
            or Whr.shape[0] != P or Whr.shape[1] != H:
        raise ValueError("lstmp_step_reference: shapes do not fit x (I), W (4H, I), R (4H, P), Whr (P, H)")
    cdef const float[::1] Bv
    cdef const float *bp = NULL
    if B is not None:
        Bv = B
        if Bv.shape[0] != 8 * H:
            raise ValueError("lstmp_step_reference: B must have 8H floats")
        bp = &Bv[0]
    work = np.empty(5 * H, np.float32)
    cdef float[::1] wv = work
    rnn_lstmp_step_ref(I, H, P, &x[0], &W[0, 0], &R[0, 0], bp, &Whr[0, 0], &h[0], &c[0], &wv[0])


def apply_activation(int kind, float alpha, float beta, x):
    """Applies one activation function of the core to a float32 vector (a copy); for tests."""
    arr = np.array(x, dtype=np.float32, copy=True).reshape(-1)
    cdef float[::1] v = arr
    cdef rnn_activation act
    act.kind = kind
    act.alpha = alpha
    act.beta = beta
    if not 0 <= kind < RNN_ACT_COUNT:
        raise ValueError(f"unknown activation kind {kind}")
    if v.shape[0]:
        with nogil:
            rnn_activation_apply(&act, &v[0], v.shape[0])
    return arr


cdef object _float_input(x, what):
    """x as a C-contiguous float32 array; any float dtype is converted, others refused."""
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise TypeError(f"{what} must be a float array (float32 preferred), got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


cdef object _stored_codes(a, dtype, shape):
    """A stored weight as the C-contiguous array of exactly `dtype` and `shape` C reads."""
    arr = np.asarray(a)
    if arr.dtype != np.dtype(dtype) or arr.shape != tuple(shape):
        raise ValueError(f"stored weights must be {np.dtype(dtype)} {tuple(shape)}, got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


cdef const void *_panel_ptr(object panel, int64_t N, int64_t K, int32_t dtype, object borrowed,
                            const float **scale, what) except? NULL:
    """The data pointer of one mapped panel (uint8 bytes, scales or None), after checking
    that it holds exactly the panels of an (N, K) matrix in `dtype` (pack.c's layout) and,
    for int8, ceil(N/16)*16 scales; appends what it points into to `borrowed`."""
    cdef int64_t w = rnn_panel_width(), padded = (N + w - 1) // w * w
    cdef int64_t want = padded * K * (4, 2, 1)[dtype]
    if panel is None:
        raise ValueError(f"{what}: mapped panels missing")
    data, scales = panel
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1 \
            or not data.flags.c_contiguous or data.shape[0] != want:
        raise ValueError(f"{what}: mapped panels must be {want} contiguous uint8 bytes "
                         f"({N} x {K} {('float32', 'float16', 'int8')[dtype]} in panels of {w})")
    if (dtype == 2) != (scales is not None):
        raise ValueError(f"{what}: int8 panels need their scales, other storage none")
    cdef cnp.ndarray d = data
    cdef cnp.ndarray sc
    scale[0] = NULL
    if scales is not None:
        if not isinstance(scales, np.ndarray) or scales.dtype != np.float32 or scales.ndim != 1 \
                or not scales.flags.c_contiguous or scales.shape[0] != padded:
            raise ValueError(f"{what}: mapped scales must be {padded} contiguous float32")
        sc = scales
        scale[0] = <const float *>cnp.PyArray_DATA(sc)
        borrowed.append(scales)
    if (<uintptr_t>cnp.PyArray_DATA(d)) % 64:
        raise ValueError(f"{what}: mapped panels must start at a 64-byte aligned address")
    borrowed.append(data)
    return cnp.PyArray_DATA(d)


cdef int _create_mapped(rnn_cell_config *cfg, const float *W, const float *R, const float *bp, const float *pp,
                        const rnn_stored_weights *sw, dict mapped, list borrowed, rnn_cell **out) except -1:
    """rnn_cell_create_mapped over the panels of a cell's "mapped" entry (see Stack), after
    checking their sizes here; C compares their bytes with a packing of W and R."""
    cdef rnn_mapped_weights m
    cdef int64_t H = cfg.hidden_size
    cdef int64_t G = 4 if cfg.kind == RNN_CELL_LSTM else (3 if cfg.kind == RNN_CELL_GRU else 1)
    cdef bint split = cfg.kind == RNN_CELL_GRU and not cfg.linear_before_reset
    if cfg.proj_size:
        raise ValueError("mapped panels: no projection")
    m.Wp = _panel_ptr(mapped["Wp"], G * H, cfg.input_size, cfg.weight_dtype, borrowed, &m.Wp_scale, "W")
    m.Rp = _panel_ptr(mapped["Rp"], 2 * H if split else G * H, H, cfg.weight_dtype, borrowed, &m.Rp_scale, "R")
    m.Rhp = NULL
    m.Rhp_scale = NULL
    if split:
        m.Rhp = _panel_ptr(mapped["Rhp"], H, H, cfg.weight_dtype, borrowed, &m.Rhp_scale, "R[2H:]")
    elif mapped.get("Rhp") is not None:
        raise ValueError("mapped Rhp is for a GRU with linear_before_reset = 0 only")
    cdef rnn_status st
    with nogil:
        st = rnn_cell_create_mapped(cfg, W, R, bp, pp, sw, &m, out)
    if st == RNN_STATUS_BAD_ARGUMENT:
        raise ValueError("mapped panels differ from the packing of W and R (a stale or damaged panel cache)")
    return <int>st


cdef class Stack:
    """A compiled stack of recurrent layers (an rnn_stack handle). Immutable; thread-safe.

    ``layers`` is a list of dicts with keys: kind, direction, input_size, hidden_size,
    cells (one dict per direction: act [(kind, alpha, beta)] * 3, clip (float or None),
    input_forget, linear_before_reset, W, R, B (or None), P (or None); float32 C-contiguous),
    and optionally step_mask (1 or 2: input rows carry a per-row step mask as their last float,
    masked steps repeat the state (1) or output zeros (2); first layer only) and, for an LSTM,
    proj_size (P > 0: an output projection, each cell then has Whr (P, H) and R (4H, P); h and
    the layer's output per direction are P floats, c keeps H). A cell whose weight_dtype is
    float16 / int8 may carry "stored": (W, R, W_scale, R_scale), its W and R as a weight file
    stores them (float16 arrays, or int8 codes with float32 row scales); the kernels then read
    those exactly (rnn_cell_create_stored), and W must be their float32 values.

    A cell may also carry "mapped": {"Wp": panel, "Rp": panel, "Rhp": panel or None}, each
    panel (uint8 bytes, int8 scales float32 or None): the packed panels the cell then reads in
    place instead of packing its own (rnn_cell_create_mapped; typically views of the panel
    cache file, shared by every process serving the model: rnnengine/format/panels.py). Their
    sizes, dtypes and alignment are checked here, and C compares every byte with a packing of
    the cell's W and R (or "stored"), panel by panel: different panels raise ValueError. The
    cell also reads its W in place. The stack keeps these buffers alive.
    """
    cdef rnn_stack *ptr
    cdef readonly int input_size, output_size, n_layers, last_hidden
    cdef readonly tuple layer_shapes  # per layer: (kind, D, H, has_c); last_hidden: floats of its h
    cdef readonly bint mapped         # its cells read W and the panels from the callers' buffers
    cdef object _borrowed             # those buffers (kept alive as long as the cells read them)

    def __cinit__(self, list layers):
        self.ptr = NULL
        cdef int32_t n = len(layers)
        if n == 0:
            raise ValueError("a stack needs at least one layer")
        cdef int32_t *dirs = <int32_t *>calloc(n, sizeof(int32_t))
        cdef rnn_cell **cells = <rnn_cell **>calloc(2 * n, sizeof(rnn_cell *))
        cdef rnn_cell_config cfg
        cdef rnn_status st
        cdef int k = 0, a
        cdef const float[:, ::1] W
        cdef const float[:, ::1] R
        cdef const float[::1] Bv
        cdef const float[::1] Pv
        cdef const float[:, ::1] Whr
        cdef const float *bp
        cdef const float *pp
        cdef const float *whrp
        cdef rnn_stored_weights sw
        cdef const rnn_stored_weights *swp
        cdef const float *rp
        cdef const uint16_t[:, ::1] W16
        cdef const uint16_t[:, ::1] R16
        cdef const int8_t[:, ::1] Wq
        cdef const int8_t[:, ::1] Rq
        cdef const float[::1] Ws
        cdef const float[::1] Rs
        shapes = []
        borrowed = []
        try:
            if dirs == NULL or cells == NULL:
                raise MemoryError()
            for li, layer in enumerate(layers):
                dirs[li] = DIRECTIONS[layer["direction"]]
                kind = CELL_KINDS[layer["kind"]]
                shapes.append((layer["kind"], len(layer["cells"]), layer["hidden_size"], kind == RNN_CELL_LSTM))
                for cell in layer["cells"]:
                    cfg.kind = kind
                    cfg.input_size = layer["input_size"]
                    cfg.hidden_size = layer["hidden_size"]
                    for a in range(3):
                        cfg.act[a].kind, cfg.act[a].alpha, cfg.act[a].beta = cell["act"][a]
                    cfg.has_clip = cell["clip"] is not None
                    cfg.clip = cell["clip"] if cell["clip"] is not None else 0.0
                    cfg.input_forget = cell["input_forget"]
                    cfg.linear_before_reset = cell["linear_before_reset"]
                    cfg.weight_dtype = WEIGHT_DTYPES[cell.get("weight_dtype", "float32")]
                    # a step mask rides as one extra float after each input row (rnnengine.h)
                    cfg.step_mask = int(layer.get("step_mask") or 0)
                    cfg.proj_size = int(layer.get("proj_size") or 0)
                    W = cell["W"]
                    R = cell["R"]
                    bp = NULL
                    pp = NULL
                    whrp = NULL
                    if cfg.proj_size:
                        Whr = cell["Whr"]
                        whrp = &Whr[0, 0]
                    if cell["B"] is not None:
                        Bv = cell["B"]
                        bp = &Bv[0]
                    if cell["P"] is not None:
                        Pv = cell["P"]
                        pp = &Pv[0]
                    stored = cell.get("stored")
                    if stored is not None:
                        sw.W_scale = NULL
                        sw.R_scale = NULL
                        if cfg.weight_dtype == 1:  # float16: the halves' bits
                            W16 = _stored_codes(stored[0], np.float16, (W.shape[0], W.shape[1])).view(np.uint16)
                            R16 = _stored_codes(stored[1], np.float16, (R.shape[0], R.shape[1])).view(np.uint16)
                            sw.W = &W16[0, 0]
                            sw.R = &R16[0, 0]
                        elif cfg.weight_dtype == 2:
                            Wq = _stored_codes(stored[0], np.int8, (W.shape[0], W.shape[1]))
                            Rq = _stored_codes(stored[1], np.int8, (R.shape[0], R.shape[1]))
                            Ws = _stored_codes(stored[2], np.float32, (W.shape[0],))
                            Rs = _stored_codes(stored[3], np.float32, (R.shape[0],))
                            sw.W, sw.R, sw.W_scale, sw.R_scale = &Wq[0, 0], &Rq[0, 0], &Ws[0], &Rs[0]
                        else:
                            raise ValueError("stored weights need weight_dtype float16 or int8")
                    if cell.get("mapped") is not None:
                        # the cell reads W in place (not copied): kept alive with the stack
                        borrowed.append(cell["W"])
                        rp = NULL
                        swp = NULL
                        if stored is None:
                            rp = &R[0, 0]
                        else:
                            swp = &sw
                        st = <rnn_status>_create_mapped(&cfg, &W[0, 0], rp, bp, pp, swp, cell["mapped"], borrowed,
                                                        &cells[k])
                    elif stored is None:
                        st = rnn_cell_create_projected(&cfg, &W[0, 0], &R[0, 0], bp, pp, whrp, &cells[k])
                    else:
                        st = rnn_cell_create_stored(&cfg, &W[0, 0], bp, pp, &sw, &cells[k])
                    _check(st, f"layer {li}: creating a {layer['kind']} cell")
                    k += 1
        except BaseException:
            for a in range(k):
                rnn_cell_free(cells[a])
            free(dirs)
            free(cells)
            raise
        st = rnn_stack_create(n, dirs, cells, &self.ptr)
        free(dirs)
        free(cells)
        _check(st, "building the layer stack")
        self.n_layers = n
        self.input_size = rnn_stack_input_size(self.ptr)
        self.output_size = rnn_stack_output_size(self.ptr)
        self.layer_shapes = tuple(shapes)
        self.mapped = bool(borrowed)
        self._borrowed = borrowed
        self.last_hidden = layers[n - 1].get("proj_size") or shapes[len(shapes) - 1][2]

    def __dealloc__(self):
        rnn_stack_free(self.ptr)

    def packed_weights(self, int layer, int direction, int which):
        """What the kernels of one cell read: (elements (N, K) in their storage, float32 /
        float16 / int8 codes, and the int8 row scales or None), which = 0 W, 1 R (a GRU
        without linear_before_reset: R[:2H]), 2 that GRU's R[2H:], 3 Whr; None when the cell
        has none. For tests."""
        cdef const rnn_packed *p = rnn_stack_packed(self.ptr, layer, direction, which)
        if p == NULL:
            return None
        dt = {0: np.float32, 1: np.float16, 2: np.int8}[p.dtype]
        out = np.zeros((p.N, p.K), dt)
        scales = np.zeros(p.N, np.float32) if p.dtype == 2 else None
        cdef cnp.ndarray o = out
        cdef float[::1] sv
        cdef float *sp = NULL
        if scales is not None and p.N:
            sv = scales
            sp = &sv[0]
        rnn_packed_unpack(p, cnp.PyArray_DATA(o), sp)
        return out, scales

    def panel_raw(self, int layer, int direction, int which):
        """The packed panels of one cell exactly as the kernels read them (which as in
        packed_weights): (data as uint8 bytes, int8 scales float32 (ceil(N/16)*16) or None,
        N, K, dtype name), copies; None when the cell has none. What the panel cache stores."""
        cdef const rnn_packed *p = rnn_stack_packed(self.ptr, layer, direction, which)
        if p == NULL:
            return None
        cdef int64_t w = rnn_panel_width(), padded = (p.N + w - 1) // w * w
        cdef int64_t nbytes = padded * p.K * (4, 2, 1)[p.dtype]
        data = np.empty(nbytes, np.uint8)
        cdef cnp.ndarray d = data
        if nbytes:
            memcpy(cnp.PyArray_DATA(d), p.data, nbytes)
        scales = None
        cdef cnp.ndarray sc
        if p.scale != NULL:
            scales = np.empty(padded, np.float32)
            sc = scales
            if padded:
                memcpy(cnp.PyArray_DATA(sc), p.scale, padded * sizeof(float))
        return data, scales, p.N, p.K, ("float32", "float16", "int8")[p.dtype]

    def panel_address(self, int layer, int direction, int which):
        """The address of one cell's panel data (which as in packed_weights), or None. For
        tests: where the kernels read from (a mapped stack: inside the panel cache's map)."""
        cdef const rnn_packed *p = rnn_stack_packed(self.ptr, layer, direction, which)
        return None if p == NULL else <uintptr_t>p.data

    def state_size(self, int64_t batch):
        return rnn_stack_state_floats(self.ptr, batch)

    def state_offset(self, int layer, int64_t batch, bint want_c):
        return rnn_stack_state_offset(self.ptr, layer, batch, want_c)

    def workspace_size(self, int64_t T, int64_t batch):
        return rnn_stack_workspace_floats(self.ptr, T, batch)

    def forward(self, const float[:, :, ::1] X, lens, float[::1] Y, int64_t ys_t, int64_t ys_b,
                int64_t ys_d, float[::1] state, float[::1] work, bint batch_first, int threads=1):
        """Runs the stack; all buffers are validated by the caller (rnnengine.runtime.model).
        threads > 1 splits each step's products by gate rows (rnn_stack_forward_threads)."""
        cdef int64_t T = X.shape[1] if batch_first else X.shape[0]
        cdef int64_t B = X.shape[0] if batch_first else X.shape[1]
        cdef const int32_t[::1] lv
        cdef const int32_t *lp = NULL
        if X.shape[2] != self.input_size:
            raise ValueError(f"input has {X.shape[2]} features, the model expects {self.input_size}")
        if state.shape[0] != rnn_stack_state_floats(self.ptr, B):
            raise ValueError("state buffer has the wrong size")
        if work.shape[0] < rnn_stack_workspace_floats(self.ptr, T, B):
            raise ValueError("workspace buffer is too small")
        if lens is not None:
            lv = lens
            if lv.shape[0] != B:
                raise ValueError(f"lengths has {lv.shape[0]} entries, batch is {B}")
            lp = &lv[0] if B else NULL
        if T == 0 or B == 0:
            return
        cdef int64_t last = (T - 1) * ys_t + (B - 1) * ys_b + (rnn_stack_output_size(self.ptr) - 1)
        if ys_t < 0 or ys_b < 0 or ys_d < 0 or last >= Y.shape[0]:
            raise ValueError("output buffer too small for its strides")
        cdef rnn_status st
        with nogil:
            st = rnn_stack_forward_threads(self.ptr, &X[0, 0, 0], T, B, batch_first, lp, &Y[0], ys_t, ys_b,
                                           ys_d, &state[0], &work[0], threads)
        _check(st, "forward")


# Scratch memory of stream steps, one buffer per thread (grown as needed) rather than one
# per stream: a thousand streams then cost their states, not a thousand workspaces. A
# thread runs one step at a time, so its buffer is never in use twice.
_tls = threading.local()


cdef cnp.ndarray _thread_work(int64_t n):
    cdef object buf = getattr(_tls, "work", None)
    if buf is None or cnp.PyArray_SIZE(<cnp.ndarray>buf) < n:
        buf = np.empty(max(n, 4096), np.float32)
        _tls.work = buf
    return <cnp.ndarray>buf


def _only_x(dict d, what):
    """The array of a layer-stack stream's dict input {"X": array}."""
    if len(d) != 1 or "X" not in d:
        raise ValueError(f"{what}(): a layer-stack model's stream takes the input 'X' only, got {sorted(map(str, d))}")
    return d["X"]


cdef class Stream:
    """Recurrent state of ``batch_size`` rows kept between calls to step() and feed().

    Made by :meth:`rnnengine.Model.stream`. One stream is used by one thread at a time;
    many streams of one model may run in parallel threads.
    """
    cdef readonly object model
    cdef Stack stack
    cdef readonly int batch_size
    cdef readonly bint batch_first
    cdef object _state          # float32 (S,): this stream's state, layout of rnn_stack
    cdef object _initial        # float32 (S,): what reset() restores
    cdef int64_t _ws1           # workspace floats of one step
    cdef float *_state_p        # data pointer of _state (kept alive by it)
    cdef bint _busy             # a call is running on this stream (set and tested with the GIL held)
    cdef int _threads           # the model's threads: each step's products split over them

    def __cinit__(self, model, Stack stack, int batch_size, initial, bint batch_first):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.stack = stack
        self.batch_size = batch_size
        self.batch_first = batch_first
        self._initial = np.ascontiguousarray(initial, dtype=np.float32)
        if self._initial.shape != (stack.state_size(batch_size),):
            raise ValueError("initial state has the wrong size")
        self._state = self._initial.copy()
        self._state_p = <float *>cnp.PyArray_DATA(<cnp.ndarray>self._state)
        self._ws1 = stack.workspace_size(1, batch_size)
        self._threads = max(1, int(getattr(model, "threads", 1) or 1))

    def step(self, x, out=None):
        """Advances one time step. x: (batch_size, input_size), or (input_size,) when
        batch_size is 1. Returns the top layer's output, (batch_size, output_size) or
        (output_size,), written into ``out`` when given. A dict {"X": x} gives {"Y": y}."""
        if type(x) is dict:
            return {"Y": self.step(_only_x(x, "step"), out)}
        cdef Stack stack = self.stack
        cdef int64_t B = self.batch_size
        cdef cnp.ndarray arr
        if not (type(x) is np.ndarray and cnp.PyArray_TYPE(<cnp.ndarray>x) == cnp.NPY_FLOAT32
                and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>x)):
            x = _float_input(x, "step(): x")
        arr = <cnp.ndarray>x
        cdef int nd = cnp.PyArray_NDIM(arr)
        cdef cnp.npy_intp *dims = cnp.PyArray_DIMS(arr)
        cdef bint squeeze = nd == 1
        if not ((nd == 2 and dims[0] == B and dims[1] == stack.input_size) or
                (squeeze and B == 1 and dims[0] == stack.input_size)):
            raise ValueError(f"step() expects x of shape ({B}, {stack.input_size})"
                             f"{' or (%d,)' % stack.input_size if B == 1 else ''}, got {x.shape}")
        cdef cnp.ndarray res
        if out is None:
            shape = (stack.output_size,) if squeeze else (int(B), stack.output_size)
            res = np.empty(shape, np.float32)
        else:
            if not (type(out) is np.ndarray and cnp.PyArray_TYPE(<cnp.ndarray>out) == cnp.NPY_FLOAT32
                    and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>out)
                    and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>out)
                    and cnp.PyArray_SIZE(<cnp.ndarray>out) == B * stack.output_size):
                raise ValueError(f"out must be a writeable C-contiguous float32 array of "
                                 f"{B * stack.output_size} elements")
            res = <cnp.ndarray>out
        cdef const float *xp = <const float *>cnp.PyArray_DATA(arr)
        cdef float *yp = <float *>cnp.PyArray_DATA(res)
        cdef float *wp = <float *>cnp.PyArray_DATA(_thread_work(self._ws1))
        cdef rnn_status st
        self._enter()
        try:
            with nogil:
                st = rnn_stack_forward_threads(stack.ptr, xp, 1, B, 0, NULL, yp, 0, stack.output_size,
                                               stack.last_hidden, self._state_p, wp, self._threads)
        finally:
            self._busy = False
        if st != RNN_STATUS_OK:
            _check(st, "step")
        return res

    def feed(self, xs, out=None):
        """Advances len(xs) time steps. xs: (T, batch_size, input_size), or
        (batch_size, T, input_size) for a batch_first model; a 2-D (T, input_size) when
        batch_size is 1. Returns the top layer's outputs in the same layout (written into
        ``out`` when given). A dict {"X": xs} gives {"Y": ys}."""
        if type(xs) is dict:
            return {"Y": self.feed(_only_x(xs, "feed"), out)}
        cdef Stack stack = self.stack
        arr = _float_input(xs, "feed(): xs")
        squeeze = arr.ndim == 2 and self.batch_size == 1
        if squeeze:
            arr = arr[:, None, :] if not self.batch_first else arr[None, :, :]
        bdim = 0 if self.batch_first else 1
        if arr.ndim != 3 or arr.shape[bdim] != self.batch_size or arr.shape[2] != stack.input_size:
            want = ("(batch_size, T, input_size)" if self.batch_first else "(T, batch_size, input_size)")
            raise ValueError(f"feed() expects xs of shape {want} = "
                             f"{'(%d, T, %d)' % (self.batch_size, stack.input_size) if self.batch_first else '(T, %d, %d)' % (self.batch_size, stack.input_size)}"
                             f", got {np.shape(xs)}")
        T = arr.shape[1 - bdim]
        shape_y = arr.shape[:2] + (stack.output_size,)
        if out is None:
            Y = np.zeros(shape_y, np.float32)
        else:
            out_shape = ((shape_y[0], shape_y[2]) if not self.batch_first else (shape_y[1], shape_y[2])) \
                if squeeze else shape_y
            if not (type(out) is np.ndarray and out.dtype == np.float32 and out.flags.c_contiguous
                    and out.flags.writeable and out.shape == out_shape):
                raise ValueError(f"out must be a writeable C-contiguous float32 array of shape {out_shape}")
            Y = out.reshape(shape_y)
            Y[...] = 0.0
        if T:
            B = self.batch_size
            DH = stack.output_size
            ys_t, ys_b = (DH, T * DH) if self.batch_first else (B * DH, DH)
            work = _thread_work(stack.workspace_size(T, B))
            self._enter()
            try:
                stack.forward(arr, None, Y.reshape(-1), ys_t, ys_b, stack.last_hidden, self._state,
                              work[:stack.workspace_size(T, B)], self.batch_first, self._threads)
            finally:
                self._busy = False
        if out is not None:
            return out
        return Y[:, 0, :] if squeeze and not self.batch_first else (Y[0] if squeeze else Y)

    @property
    def delay(self):
        """Input steps by which outputs trail the input: 0 (a layer stack never looks ahead)."""
        return 0

    def finish(self):
        """Nothing is held back in a layer stack: an empty output (no time steps)."""
        if self.batch_first:
            return np.zeros((int(self.batch_size), 0, int(self.stack.output_size)), np.float32)
        return np.zeros((0, int(self.batch_size), int(self.stack.output_size)), np.float32)

    cdef _enter(self):
        """Marks the stream in use; a second thread using it at the same time gets an error
        instead of steps silently lost and a torn state. The GIL is held here, so testing and
        setting the flag cannot interleave with another thread's."""
        if self._busy:
            raise RuntimeError("this stream is being used by another thread at the same time; a stream "
                               "carries one sequence, so use it from one thread at a time (or fork() it)")
        self._busy = True

    def reset(self):
        """Restores the model's initial state (zeros unless the model defines one)."""
        self._enter()
        self._busy = False
        self._state[...] = self._initial

    def fork(self):
        """A new, independent stream that starts from a copy of this stream's state."""
        s = Stream(self.model, self.stack, self.batch_size, self._initial, self.batch_first)
        s._state[...] = self._state
        return s

    def get_state(self):
        """A copy of the state (rnnengine.State): {"layers": {"layer0": (h, c) for an LSTM,
        h otherwise, ...}, "inputs": {}, "context": {}}, each array of shape
        (num_directions, batch_size, hidden_size)."""
        return self.model.unpack_state(self._state, self.batch_size)

    def set_state(self, state):
        """Replaces the state (same structure as get_state() returns)."""
        packed = self.model._pack_state(state, self.batch_size)
        self._enter()
        self._busy = False
        self._state[...] = packed

    def get_state_vector(self):
        """A copy of the raw state (rnn_stack layout); see Model for the structured form."""
        return self._state.copy()

    def set_state_vector(self, v):
        v = np.asarray(v, dtype=np.float32).reshape(-1)
        if v.shape != self._state.shape:
            raise ValueError(f"state vector must have {self._state.shape[0]} floats, got {v.shape[0]}")
        self._state[...] = v

    cdef float *_state_ptr(self):
        return self._state_p


def step_streams(list streams, x, out=None):
    """Steps several single-row streams of one model together in one batched call.
    x: (n, input_size); returns (n, output_size). Each stream keeps its own state."""
    cdef int64_t n = len(streams)
    if n == 0:
        raise ValueError("step_streams() needs at least one stream")
    cdef Stream first = streams[0]
    cdef Stack stack = first.stack
    cdef Stream s
    for i, obj in enumerate(streams):
        if not isinstance(obj, Stream):
            raise TypeError(f"streams[{i}] is a {type(obj).__name__}, not a Stream")
        s = obj
        if s.stack is not stack:
            raise ValueError(f"streams[{i}] belongs to another model")
        if s.batch_size != 1:
            raise ValueError(f"streams[{i}] has batch_size {s.batch_size}; step_streams() "
                             "takes streams of batch_size 1")
    if len(set(map(id, streams))) != n:
        raise ValueError("the same stream appears twice in step_streams()")
    arr = _float_input(x, "step_streams(): x")
    if arr.shape != (n, stack.input_size):
        raise ValueError(f"step_streams() expects x of shape ({n}, {stack.input_size}), got {arr.shape}")
    res = np.empty((n, stack.output_size), np.float32) if out is None else out
    if not (isinstance(res, np.ndarray) and res.dtype == np.float32 and res.flags.c_contiguous
            and res.shape == (n, stack.output_size)):
        raise ValueError(f"out must be a C-contiguous float32 array of shape ({n}, {stack.output_size})")
    ptrs_arr = np.empty(n, dtype=np.uintp)
    cdef uintptr_t[::1] ptrs = ptrs_arr
    for i in range(n):
        s = streams[i]
        ptrs[i] = <uintptr_t>s._state_ptr()
    for i in range(n):  # every stream in use for the call (released below, also on error)
        s = streams[i]
        try:
            s._enter()
        except RuntimeError:
            for j in range(i):
                (<Stream>streams[j])._busy = False
            raise
    # scratch from this thread's buffers (no allocation per call): the batched state after
    # the workspace, in one buffer
    cdef int64_t ws = stack.workspace_size(1, n), ss = stack.state_size(n)
    buf = _thread_work(ws + ss + 16)
    cdef float[::1] wv = buf[:ws]
    cdef float[::1] bs = buf[ws + 16:ws + 16 + ss]
    cdef const float[:, ::1] xv = arr
    cdef float[:, ::1] yv = res
    cdef rnn_status st
    cdef int threads = first._threads
    try:
        with nogil:
            rnn_stack_gather_states(stack.ptr, &bs[0], <float **>&ptrs[0], n)
            st = rnn_stack_forward_threads(stack.ptr, &xv[0, 0], 1, n, 0, NULL, &yv[0, 0], 0, stack.output_size,
                                           stack.last_hidden, &bs[0], &wv[0], threads)
            if st == RNN_STATUS_OK:
                rnn_stack_scatter_states(stack.ptr, &bs[0], <float **>&ptrs[0], n)
    finally:
        for i in range(n):
            (<Stream>streams[i])._busy = False
    _check(st, "step_streams")
    return res


# --- the session batcher's core (src_c/batch.c) ---------------------------------------------

cdef class BatchCore:
    """The C side of rnnengine.Batcher for a layer-stack model: slots holding single-row
    states in pooled memory, and a scheduler thread (C, no GIL) stepping the rows submitted
    to them in batches. Users meet it through rnnengine.Batcher / Session, which make sure a
    slot has at most one call in flight (the C side refuses a second with BAD_SLOT)."""
    cdef rnn_batcher *ptr
    cdef readonly Stack stack
    cdef readonly int input_size, output_size
    cdef readonly int64_t state_size
    cdef int _threads

    def __cinit__(self, Stack stack, int max_batch, double max_wait_us, int max_queue, int max_slots,
                  int threads):
        self.ptr = NULL
        self.stack = stack
        self.input_size = stack.input_size
        self.output_size = stack.output_size
        self.state_size = stack.state_size(1)
        self._threads = threads
        cdef rnn_batcher *b = NULL
        st = rnn_batcher_create(stack.ptr, stack.last_hidden, max_batch, <int64_t>(max_wait_us * 1000.0),
                                max_queue, max_slots, threads, &b)
        _check(st, "Batcher")
        self.ptr = b

    def __dealloc__(self):
        if self.ptr != NULL:
            with nogil:
                rnn_batcher_free(self.ptr)
            self.ptr = NULL

    def stop(self):
        """Runs the rows already queued, then ends the scheduler thread."""
        with nogil:
            rnn_batcher_stop(self.ptr)

    cdef int _raise(self, int32_t r, int32_t status, what) except -1:
        from rnnengine.errors import SessionClosedError
        if r == RNN_BATCH_CLOSED:
            raise SessionClosedError("this batcher is closed")
        if r == RNN_BATCH_TIMEOUT:
            raise TimeoutError(f"{what}: the step did not start within the timeout; it was withdrawn (not applied)")
        if r == RNN_BATCH_FULL:
            raise RuntimeError(f"{what}: no room (max_queue steps in flight or max_sessions open)")
        if r == RNN_BATCH_BAD_SLOT:
            raise SessionClosedError("this session is closed")
        if r == RNN_BATCH_FAILED:
            _check(<rnn_status>status, what)
        raise EngineError(f"{what}: unknown result {r}")

    def open(self, cnp.ndarray state):
        """A new slot holding a copy of ``state`` (float32, state_size floats); its id."""
        if not (state.dtype == np.float32 and state.flags.c_contiguous and state.size == self.state_size):
            raise ValueError(f"a slot's state is {self.state_size} contiguous float32 values")
        cdef int32_t r = rnn_batcher_open(self.ptr, <const float *>cnp.PyArray_DATA(state))
        if r < 0:
            if -r == RNN_BATCH_FULL:
                raise RuntimeError("no room for another session: max_sessions are open")
            self._raise(-r, RNN_STATUS_OUT_OF_MEMORY, "open")
        return r

    def close_slot(self, int32_t slot):
        cdef int32_t r = rnn_batcher_close_slot(self.ptr, slot)
        if r != RNN_BATCH_OK:
            self._raise(r, 0, "close")

    cdef float *_state(self, int32_t slot) except NULL:
        cdef float *p = rnn_batcher_slot_state(self.ptr, slot)
        if p == NULL:
            from rnnengine.errors import SessionClosedError
            raise SessionClosedError("this session is closed")
        return p

    def get_state(self, int32_t slot):
        """A copy of an idle slot's state (state_size floats)."""
        cdef float *p = self._state(slot)
        out = np.empty(self.state_size, np.float32)
        memcpy(cnp.PyArray_DATA(<cnp.ndarray>out), p, self.state_size * sizeof(float))
        return out

    def set_state(self, int32_t slot, cnp.ndarray v):
        if not (v.dtype == np.float32 and v.flags.c_contiguous and v.size == self.state_size):
            raise ValueError(f"a slot's state is {self.state_size} contiguous float32 values")
        cdef float *p = self._state(slot)
        memcpy(p, cnp.PyArray_DATA(v), self.state_size * sizeof(float))

    cdef cnp.ndarray _row(self, x, what):
        """x as one contiguous float32 row of input_size values (a view when it is one)."""
        cdef cnp.ndarray arr
        if type(x) is np.ndarray and cnp.PyArray_TYPE(<cnp.ndarray>x) == cnp.NPY_FLOAT32 \
                and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>x):
            arr = <cnp.ndarray>x
        else:
            arr = _float_input(x, what)
        if cnp.PyArray_SIZE(arr) != self.input_size or not (arr.ndim == 1 or (arr.ndim == 2 and arr.shape[0] == 1)):
            raise ValueError(f"{what} must have shape ({self.input_size},) (one row of the model's input), "
                             f"got {np.shape(x)}")
        return arr

    def step(self, int32_t slot, x, double timeout=-1.0):
        """One step of a slot (blocks until its batch has run); the output row."""
        cdef cnp.ndarray arr = self._row(x, "step(): x")
        cdef cnp.ndarray y = np.empty(self.output_size, np.float32)
        cdef const float *xp = <const float *>cnp.PyArray_DATA(arr)
        cdef float *yp = <float *>cnp.PyArray_DATA(y)
        cdef int64_t t_ns = <int64_t>(timeout * 1e9) if timeout >= 0 else -1
        cdef int32_t r, status = 0
        with nogil:
            r = rnn_batcher_step(self.ptr, slot, xp, yp, t_ns, &status)
        if r != RNN_BATCH_OK:
            self._raise(r, status, "step")
        return y

    def check_row(self, x):
        """x as the contiguous float32 row submit() takes (raises naming what is wrong)."""
        return self._row(x, "step(): x")

    def submit(self, int32_t slot, cnp.ndarray x, cnp.ndarray y):
        """Queues a step without waiting: x from check_row(), y a float32 array of output_size
        values; both must stay alive until completions() hands the slot out. Returns an
        rnn_batch_result (OK, or FULL: try again later; others raise)."""
        if not (x.dtype == np.float32 and x.flags.c_contiguous and x.size == self.input_size and
                y.dtype == np.float32 and y.flags.c_contiguous and y.flags.writeable and y.size == self.output_size):
            raise ValueError("submit(): x and y must be contiguous float32 rows of the model's sizes")
        cdef int32_t r = rnn_batcher_submit(self.ptr, slot, <const float *>cnp.PyArray_DATA(x),
                                            <float *>cnp.PyArray_DATA(y))
        if r != RNN_BATCH_OK and r != RNN_BATCH_FULL:
            self._raise(r, 0, "step")
        return r

    def withdraw(self, int32_t slot):
        """True: the slot's submitted step had not started and never will."""
        return bool(rnn_batcher_withdraw(self.ptr, slot))

    def set_notify_fd(self, int fd):
        """fd >= 0: the scheduler writes a byte to fd (a non-blocking pipe) when asynchronous
        steps complete and none were pending, so an event loop watching it can collect them
        with completions(0); -1: no writes. The fd must stay open until set back to -1."""
        rnn_batcher_set_notify_fd(self.ptr, fd)

    def completions(self, double timeout):
        """Waits up to ``timeout`` s for submitted steps to finish: a list of (slot, error or
        None); None once the scheduler has ended and nothing is left."""
        cdef int32_t ids[256]
        cdef int32_t res[256]
        cdef int64_t t_ns = <int64_t>(timeout * 1e9)
        cdef int32_t n
        with nogil:
            n = rnn_batcher_completions(self.ptr, ids, res, 256, t_ns)
        if n < 0:
            return None
        out = []
        for k in range(n):
            err = None
            if (res[k] & 0xff) != RNN_BATCH_OK:
                try:
                    self._raise(res[k] & 0xff, res[k] >> 8, "step")
                except Exception as e:
                    err = e
            out.append((ids[k], err))
        return out

    def feed(self, int32_t slot, xs):
        """Steps an idle slot over a chunk xs (T, input_size) in the caller's thread (the
        scheduler goes on with the other slots); (T, output_size)."""
        arr = _float_input(xs, "feed(): xs")
        if arr.ndim == 3 and arr.shape[1] == 1:
            arr = arr[:, 0, :]
        if arr.ndim != 2 or arr.shape[1] != self.input_size:
            raise ValueError(f"feed() expects xs of shape (T, {self.input_size}) or (T, 1, {self.input_size}), "
                             f"got {np.shape(xs)}")
        arr = np.ascontiguousarray(arr)
        cdef int64_t T = arr.shape[0]
        Y = np.zeros((T, self.output_size), np.float32)
        if T == 0:
            return Y
        cdef float *p = self._state(slot)
        cdef int64_t ws = self.stack.workspace_size(T, 1)
        work = _thread_work(ws)
        cdef const float *xp = <const float *>cnp.PyArray_DATA(<cnp.ndarray>arr)
        cdef float *yp = <float *>cnp.PyArray_DATA(<cnp.ndarray>Y)
        cdef float *wp = <float *>cnp.PyArray_DATA(<cnp.ndarray>work)
        cdef rnn_stack *sp = self.stack.ptr
        cdef int64_t O = self.output_size, hd = self.stack.last_hidden
        cdef int threads = self._threads
        cdef rnn_status st
        with nogil:
            st = rnn_stack_forward_threads(sp, xp, T, 1, 0, NULL, yp, O, O, hd, p, wp, threads)
        _check(st, "feed")
        return Y

    @property
    def counters(self):
        """steps, batches, largest_batch, most_queued, queued, open (slots)."""
        cdef int64_t c[6]
        rnn_batcher_counters(self.ptr, c)
        return {"steps": c[0], "batches": c[1], "largest_batch": c[2], "most_queued": c[3], "queued": c[4],
                "open": c[5]}

    def _inject_failures(self, int32_t n):
        """Tests: the next n batched calls fail without touching any state."""
        rnn_batcher_inject_failures(self.ptr, n)


def threads_limit():
    """The most threads one call of the C core uses, the caller included (rnn_threads_limit:
    RNNENGINE_NUM_THREADS, else OMP_NUM_THREADS, capped by the CPUs this process may use)."""
    return rnn_threads_limit()


def set_threads_limit(int n):
    """Sets that limit (n <= 0: back to the environment); returns the limit in force."""
    return rnn_threads_set_limit(n)


def set_threads_adaptive(bint on):
    """True (default): each product is timed split and on one thread as it runs, and the
    faster way is used (rnn_threads_set_adaptive); False: always split (tests). Returns the
    previous setting."""
    return bool(rnn_threads_set_adaptive(on))


def threads_worker_chunks():
    """Chunks of split products the pool's workers have run in this process (for tests)."""
    return rnn_threads_worker_chunks()


def set_threads_min_macs(int64_t n):
    """Products smaller than n multiply-adds stay on one thread (n < 0: the default);
    returns the value in force. Process-wide; for tests and benchmarks."""
    return rnn_threads_set_min_macs(n)


# --- graph executor -------------------------------------------------------------------------------

INSTR_WORDS = RNN_INSTR_WORDS


def address(cnp.ndarray arr):
    """Address of an array's first element (the array must stay alive while it is used)."""
    return <int64_t><uintptr_t>cnp.PyArray_DATA(arr)


cdef class Program:
    """A planned graph program (see src_c/graph.c): instructions, their parameters and the
    recurrent stacks they call. Immutable once built; many threads may run it at once, each
    with its own tensor table and workspace.

    tensor_dtypes / tensor_counts describe the buffers the program runs over (per tensor id:
    element type code, see tensor_code, and element count), tensor_writable (optional, per
    tensor 1 or 0; all 1 when not given) which of them instructions may write (not constants,
    which may be a read-only mapped weight file, nor inputs, the caller's arrays), and
    work_floats the workspace
    every run gives; the program is checked against them once, here (rnn_graph_verify), and
    refused with a ProgramError naming the instruction and its node when it does not fit."""
    cdef readonly object program, iparams, fparams, stacks, labels, tensor_dtypes, tensor_counts, tensor_writable
    cdef readonly int64_t work_floats, n_tensors
    cdef int64_t n_instr
    cdef rnn_stack **stack_ptrs

    def __cinit__(self, program, iparams, fparams, list stacks, labels=None, *, tensor_dtypes, tensor_counts,
                  int64_t work_floats, tensor_writable=None):
        # labels: per instruction, the node it computes (e.g. "Div node 'idx'"), named by errors
        self.labels = list(labels) if labels is not None else None
        self.stack_ptrs = NULL
        self.program = np.ascontiguousarray(program, dtype=np.int64).reshape(-1, RNN_INSTR_WORDS)
        self.iparams = np.ascontiguousarray(iparams, dtype=np.int64).reshape(-1)
        self.fparams = np.ascontiguousarray(fparams, dtype=np.float32).reshape(-1)
        cdef int64_t n_ip = self.iparams.size, n_fp = self.fparams.size  # what the verifier checks against
        if self.iparams.size == 0:
            self.iparams = np.zeros(1, np.int64)
        if self.fparams.size == 0:
            self.fparams = np.zeros(1, np.float32)
        self.tensor_dtypes = np.ascontiguousarray(tensor_dtypes, dtype=np.int64).reshape(-1)
        self.tensor_counts = np.ascontiguousarray(tensor_counts, dtype=np.int64).reshape(-1)
        if self.tensor_dtypes.size != self.tensor_counts.size:
            raise ValueError(f"tensor table: {self.tensor_dtypes.size} element types for "
                             f"{self.tensor_counts.size} element counts")
        if tensor_writable is None:
            tensor_writable = np.ones(self.tensor_dtypes.size, np.uint8)
        self.tensor_writable = np.ascontiguousarray(tensor_writable, dtype=np.uint8).reshape(-1)
        if self.tensor_writable.size != self.tensor_dtypes.size:
            raise ValueError(f"tensor table: {self.tensor_writable.size} writable flags for "
                             f"{self.tensor_dtypes.size} tensors")
        if self.tensor_dtypes.size == 0:  # keep the arrays' data pointers valid
            self.tensor_dtypes, self.tensor_counts = np.zeros(1, np.int64), np.zeros(1, np.int64)
            self.tensor_writable = np.zeros(1, np.uint8)
            n_tensors = 0
        else:
            n_tensors = self.tensor_dtypes.size
        self.work_floats = work_floats
        self.n_instr = self.program.shape[0]
        self.stacks = list(stacks)
        self.stack_ptrs = <rnn_stack **>calloc(max(1, len(stacks)), sizeof(rnn_stack *))
        if self.stack_ptrs == NULL:
            raise MemoryError()
        # per stack: layers, and D, H, has_c of its last layer (from the Stack, not the caller)
        stack_shape = np.zeros(4 * max(1, len(stacks)), np.int64)
        for k, s in enumerate(self.stacks):
            self.stack_ptrs[k] = (<Stack?>s).ptr
            shapes = (<Stack>s).layer_shapes  # (kind, D, H, has_c) per layer (no negative indexing here)
            stack_shape[4 * k:4 * k + 4] = (len(shapes),) + tuple(shapes[len(shapes) - 1][1:])
        cdef char err[320]
        err[0] = 0
        cdef int64_t failed = -1
        cdef rnn_status st = rnn_graph_verify(
            <const int64_t *>cnp.PyArray_DATA(self.program), self.n_instr,
            <const int64_t *>cnp.PyArray_DATA(self.iparams), n_ip, n_fp,
            <const int64_t *>cnp.PyArray_DATA(self.tensor_dtypes), <const int64_t *>cnp.PyArray_DATA(self.tensor_counts),
            <const uint8_t *>cnp.PyArray_DATA(self.tensor_writable), n_tensors, self.stack_ptrs,
            <const int64_t *>cnp.PyArray_DATA(stack_shape), len(self.stacks), work_floats, err, 320, &failed)
        if st != RNN_STATUS_OK:
            msg = err.decode("utf-8", "replace") if err[0] else rnn_status_string(st).decode()
            if self.labels is not None and 0 <= failed < len(self.labels) and self.labels[failed]:
                msg = f"{self.labels[failed]}: {msg}"
            raise ProgramError(f"the program is refused: {msg}" if failed < 0 else msg)
        self.n_tensors = n_tensors

    def __dealloc__(self):
        free(self.stack_ptrs)

    def run(self, cnp.ndarray ptrs, cnp.ndarray work, int threads=1):
        """Runs the program over the tensors whose addresses are in ptrs (int64, one per
        tensor id, each bound to a buffer of the size and type the tensor table says) with
        the float32 workspace work; the recurrent layers' products split over up to
        ``threads`` threads (bit-identical to 1). The GIL is released meanwhile."""
        if ptrs.dtype != np.int64 or not ptrs.flags.c_contiguous:
            raise TypeError("ptrs must be a C-contiguous int64 array")
        if work.dtype != np.float32 or not work.flags.c_contiguous or work.size == 0:
            raise TypeError("work must be a non-empty C-contiguous float32 array")
        if work.size < self.work_floats:
            raise ValueError(f"work has {work.size} floats, the program needs {self.work_floats}")
        cdef char err[256]
        err[0] = 0
        cdef const int64_t *prog = <const int64_t *>cnp.PyArray_DATA(self.program)
        cdef const int64_t *ip = <const int64_t *>cnp.PyArray_DATA(self.iparams)
        cdef const float *fp = <const float *>cnp.PyArray_DATA(self.fparams)
        cdef void **tens = <void **>cnp.PyArray_DATA(ptrs)
        cdef float *w = <float *>cnp.PyArray_DATA(work)
        cdef int64_t k, n = cnp.PyArray_SIZE(ptrs)
        if self.n_instr == 0:  # nothing to compute (every output a constant or an input)
            return
        if n < self.n_tensors:
            raise ValueError(f"ptrs has {n} entries, the program has {self.n_tensors} tensors")
        for k in range(self.n_tensors):  # every tensor bound: an unbound one would be a NULL dereference
            if tens[k] == NULL:
                raise ValueError(f"tensor {k} of the program is not bound to a buffer")
        cdef rnn_status st
        cdef int64_t failed = -1
        with nogil:
            st = rnn_graph_run_threads(prog, self.n_instr, ip, fp, tens, self.stack_ptrs, w, err, 256, &failed,
                                       threads)
        if st != RNN_STATUS_OK:
            msg = err.decode("utf-8", "replace") if err[0] else rnn_status_string(st).decode()
            if self.labels is not None and 0 <= failed < len(self.labels) and self.labels[failed]:
                msg = f"{self.labels[failed]}: {msg}"
            raise GraphRunError(msg)


# --- a graph stream's bound call (GraphStream in rnnengine/runtime/graph.py) -------------------
# The per-call path of a converted graph's stream in one compiled call: everything a call needs
# is bound once per (stream, plan) and each call only checks the caller's arrays and runs.

cdef extern from *:
    """
    #include <sys/stat.h>
    /* An open file's size and modification time in ns, as Python's os.fstat gives them
     * (st_size, st_mtime_ns). 0: done; -1: fstat failed; -2: no nanosecond time on this
     * platform (the caller asks Python instead). */
    static int rnn_py_fstat(int fd, long long *size, long long *mtime_ns) {
    #if defined(__linux__)
        struct stat st;
        if (fstat(fd, &st) != 0) return -1;
        *size = (long long)st.st_size;
        *mtime_ns = (long long)st.st_mtim.tv_sec * 1000000000LL + (long long)st.st_mtim.tv_nsec;
        return 0;
    #elif defined(__APPLE__)
        struct stat st;
        if (fstat(fd, &st) != 0) return -1;
        *size = (long long)st.st_size;
        *mtime_ns = (long long)st.st_mtimespec.tv_sec * 1000000000LL + (long long)st.st_mtimespec.tv_nsec;
        return 0;
    #else
        (void)fd; (void)size; (void)mtime_ns;
        return -2;
    #endif
    }
    """
    int rnn_py_fstat(int fd, long long *size, long long *mtime_ns) nogil

from cpython.dict cimport PyDict_GetItem, PyDict_SetItem, PyDict_Size
from cpython.object cimport PyObject
from cpython.weakref cimport PyWeakref_GetObject
import weakref

cdef int64_t _code_bytes(int64_t code):
    """Bytes per element of a tensor table type code (rnn_dtype; RNN_DT_OTHER + n: n bytes)."""
    if code == 0 or code == 2:   # float32, int32
        return 4
    if code == 1:                # int64
        return 8
    if code == 3 or code == 4:   # uint8, bool
        return 1
    if 100 < code <= 116:
        return code - 100
    return -1


cdef cnp.ndarray _i64(values):
    return np.ascontiguousarray(np.asarray(values, dtype=np.int64).reshape(-1)) if len(values) else np.zeros(1, np.int64)


cdef class GraphStep:
    """One stream's calls of one planned program (made by GraphStream, rnnengine/runtime/graph.py).

    Bound once: the tensor table with the plan's intermediates and constants, two buffers per
    explicit state input (``state`` fed back from ``stateN``) that successive calls alternate
    between, so the next state is written by the program itself into the buffer the previous
    call read, and nothing is copied (an output that is not a buffer of its own, e.g. the state
    input handed back unchanged, is copied); what every input and output is. Every size is
    checked here against the program's tensor table (the table rnn_graph_verify checked the
    instructions against), never taken on trust.

    call() is the whole per-call path of a stream fed arrays of the names, shapes and dtypes the
    plan was made for: exact ndarray type, shape, dtype (native byte order), C order and token
    ids inside the vocabulary are tested in C; the mapped weight file is fstat-ed; the stream's
    busy lock refuses concurrent use; the program runs without the GIL; the outputs are copied
    into new arrays. Anything else (other shapes, other dtypes, a state replaced by set_state or
    the batcher, a bad token, a lock held) returns None, and the stream takes its checked path,
    which raises the error in the user's terms or plans anew, then runs through run()."""
    cdef readonly object plan
    cdef Program program
    cdef object stream_ref, model, mapped_file, acquire, release, bufs  # (the stream by a weak reference:
    # the stream holds this object, which then never keeps it alive in a cycle)
    cdef object ptrs_arr, work_arr, tables
    cdef void **ptrs
    cdef float *work
    cdef int64_t n_tensors
    # data inputs i: name, tid, numpy type number, vocabulary (0: not token ids), bytes, and per
    # mode (0: feed, 1: step) its rank and dims at shape_at[2i + mode]
    cdef int64_t n_in
    cdef tuple in_names, in_dtypes
    cdef int64_t *in_tid
    cdef int64_t *in_type
    cdef int64_t *in_vocab
    cdef int64_t *in_nbytes
    cdef int64_t *in_nd
    cdef int64_t *in_shape_at
    cdef int64_t *shapes
    # explicit state j: name, its input tid, the paired output's tid when the program writes
    # it into the spare buffer directly (-1: copied from src after the run), bytes
    cdef int64_t n_car
    cdef tuple car_names
    cdef list car_bufs         # per state [buffer 0, buffer 1]
    cdef void **car_data       # data pointers of car_bufs, 2 per state
    cdef int64_t *car_in_tid
    cdef int64_t *car_out_tid
    cdef int64_t *car_src_tid  # copy mode: the tid the output is read from (-1: a constant)
    cdef int64_t *car_nbytes
    cdef tuple car_src_const
    cdef int cur               # which of the two buffers holds the current state
    # recurrent layers' own state k: key, tid, floats; the arrays bound last
    cdef int64_t n_ls
    cdef tuple ls_keys
    cdef list ls_arrs
    cdef int64_t *ls_tid
    cdef int64_t *ls_floats
    # outputs o: name, source tid (-1: constant), type number, bytes, rank and dims per mode
    cdef int64_t n_out
    cdef readonly tuple out_names
    cdef dict out_index
    cdef tuple out_const
    cdef int64_t *out_tid
    cdef int64_t *out_type
    cdef int64_t *out_nbytes
    cdef int64_t *out_nd
    cdef int64_t *out_shape_at
    cdef tuple model_outputs
    cdef readonly bint step_ok, track_last

    def __cinit__(self, plan, Program program, stream, model, dict bufs, int64_t work_floats, list inputs,
                  list carried, list states, list outputs, mapped_file, bint track_last, bint step_ok):
        """inputs: (name, tid, dtype, feed shape, step shape, vocabulary or 0) per data input;
        carried: (name, input tid, dtype, shape, output tid or -1, source tid or -1, source
        constant or None) per explicit state; states: (key, tid) per recurrent layer state;
        outputs: (name, source tid or -1, source constant or None, dtype, feed shape, step
        shape) per graph output; bufs: tid -> the array bound there for good (intermediates,
        constants)."""
        cdef int64_t k, j, t, nb
        self.plan, self.program, self.model = plan, program, model
        self.stream_ref = weakref.ref(stream)
        self.mapped_file = mapped_file
        self.track_last, self.step_ok = track_last, step_ok
        self.acquire, self.release = stream._busy.acquire, stream._busy.release
        self.model_outputs = tuple(model.outputs)
        n = self.n_tensors = program.n_tensors
        counts, codes = program.tensor_counts.tolist(), program.tensor_dtypes.tolist()

        def tensor_bytes(int64_t tid, what):
            if not 0 <= tid < n:
                raise EngineError(f"GraphStep: {what} names tensor {tid}, the program has {n}")
            b = _code_bytes(codes[tid])
            if b < 0:
                raise EngineError(f"GraphStep: {what}: tensor {tid} has an unknown type code {codes[tid]}")
            return counts[tid] * b

        self.ptrs_arr = np.zeros(max(1, n), np.int64)
        self.ptrs = <void **>cnp.PyArray_DATA(self.ptrs_arr)
        self.work_arr = np.zeros(max(16, work_floats), np.float32)
        if work_floats < program.work_floats:
            raise EngineError(f"GraphStep: a workspace of {work_floats} floats, the program needs {program.work_floats}")
        self.work = <float *>cnp.PyArray_DATA(self.work_arr)
        bound = set()
        self.bufs = bufs
        for t, arr in bufs.items():
            if not (isinstance(arr, np.ndarray) and arr.flags.c_contiguous) or arr.nbytes < tensor_bytes(t, "a buffer"):
                raise EngineError(f"GraphStep: the buffer of tensor {t} is not a C-contiguous array of its size")
            self.ptrs[t] = cnp.PyArray_DATA(<cnp.ndarray>arr)
            bound.add(t)

        per_call = set()

        def claim(int64_t tid, what, bint rebinds_buffer=False):
            """A tensor bound per call, by one role only (a state's paired output replaces
            the buffer the context gave it)."""
            tensor_bytes(tid, what)
            if tid in per_call or (tid in bound and not rebinds_buffer):
                raise EngineError(f"GraphStep: {what}: tensor {tid} is bound twice")
            bound.add(tid)
            per_call.add(tid)

        self.tables = []
        shapes, shape_at = [], []

        def add_shape(shape):
            shape_at.append(len(shapes))
            shapes.extend(int(d) for d in shape)
        # data inputs
        self.n_in = len(inputs)
        self.in_names = tuple(i[0] for i in inputs)
        self.in_dtypes = tuple(np.dtype(i[2]) for i in inputs)
        types, nbytes, nds, vocab = [], [], [], []
        for name, tid, dtype, fshape, sshape, voc in inputs:
            dt = np.dtype(dtype)
            claim(tid, f"input {name!r}")
            nb = int(np.prod(fshape, dtype=np.int64)) * dt.itemsize
            if nb != tensor_bytes(tid, name) or int(np.prod(sshape, dtype=np.int64)) * dt.itemsize != nb:
                raise EngineError(f"GraphStep: input {name!r} of shape {tuple(fshape)} does not fill tensor {tid}")
            types.append(dt.num)
            nbytes.append(nb)
            vocab.append(int(voc) if dt.kind == "i" and dt.itemsize in (4, 8) else 0)
            nds.extend((len(fshape), len(sshape)))
            add_shape(fshape)
            add_shape(sshape)
        self.in_tid = self._table([i[1] for i in inputs])
        self.in_type = self._table(types)
        self.in_nbytes = self._table(nbytes)
        self.in_vocab = self._table(vocab)
        self.in_nd = self._table(nds)
        # explicit state
        self.n_car = len(carried)
        self.car_names = tuple(c[0] for c in carried)
        self.car_bufs = []
        consts = []
        outs_seen = set()
        nbytes, out_tids, src_tids = [], [], []
        for name, tid, dtype, shape, out_tid, src_tid, src_const in carried:
            claim(tid, f"state input {name!r}")
            pair = [np.zeros(shape, dtype), np.zeros(shape, dtype)]
            nb = pair[0].nbytes
            if nb != tensor_bytes(tid, name):
                raise EngineError(f"GraphStep: state {name!r} of shape {tuple(shape)} does not fill tensor {tid}")
            if out_tid >= 0:  # written in place: the output's own buffer, bound per call
                claim(out_tid, f"the output paired with {name!r}", True)
                if tensor_bytes(out_tid, name) != nb:
                    raise EngineError(f"GraphStep: the output paired with {name!r} has another size")
            elif src_tid >= 0:
                if tensor_bytes(src_tid, name) < nb:
                    raise EngineError(f"GraphStep: the output paired with {name!r} is smaller than the state")
            elif not (isinstance(src_const, np.ndarray) and src_const.flags.c_contiguous and src_const.nbytes >= nb):
                raise EngineError(f"GraphStep: the constant paired with {name!r} is not an array of its size")
            self.car_bufs.append(pair)
            consts.append(src_const)
            nbytes.append(nb)
            out_tids.append(out_tid)
            src_tids.append(src_tid)
        self.car_src_const = tuple(consts)
        self.car_in_tid = self._table([c[1] for c in carried])
        self.car_out_tid = self._table(out_tids)
        self.car_src_tid = self._table(src_tids)
        self.car_nbytes = self._table(nbytes)
        self.car_data = <void **>calloc(max(1, 2 * self.n_car), sizeof(void *))
        if self.car_data == NULL:
            raise MemoryError()
        for j in range(self.n_car):
            for k in range(2):
                self.car_data[2 * j + k] = cnp.PyArray_DATA(<cnp.ndarray>self.car_bufs[j][k])
        self.cur = 0
        # recurrent layers' own state (float32 vectors the program updates in place)
        self.n_ls = len(states)
        self.ls_keys = tuple(s[0] for s in states)
        self.ls_arrs = [None] * self.n_ls
        floats = []
        for key, tid in states:
            claim(tid, f"layer state {key!r}")
            if codes[tid] != 0:
                raise EngineError(f"GraphStep: layer state {key!r} is not float32")
            floats.append(counts[tid])
        self.ls_tid = self._table([s[1] for s in states])
        self.ls_floats = self._table(floats)
        # outputs
        self.n_out = len(outputs)
        self.out_names = tuple(o[0] for o in outputs)
        self.out_index = {name: k for k, name in enumerate(self.out_names)}
        consts, types, nbytes, nds = [], [], [], []
        for name, tid, const, dtype, fshape, sshape in outputs:
            dt = np.dtype(dtype)
            nb = int(np.prod(fshape, dtype=np.int64)) * dt.itemsize
            if int(np.prod(sshape, dtype=np.int64)) * dt.itemsize != nb:
                raise EngineError(f"GraphStep: output {name!r}: shapes {fshape} and {sshape} differ in size")
            if tid >= 0:
                if tensor_bytes(tid, f"output {name!r}") < nb:
                    raise EngineError(f"GraphStep: output {name!r} of shape {tuple(fshape)} is larger than tensor {tid}")
            elif not (isinstance(const, np.ndarray) and const.flags.c_contiguous and const.nbytes >= nb):
                raise EngineError(f"GraphStep: the constant output {name!r} is not an array of its size")
            if len(fshape) > 64 or len(sshape) > 64:
                raise EngineError(f"GraphStep: output {name!r} has more than 64 dimensions")
            consts.append(const)
            types.append(dt.num)
            nbytes.append(nb)
            nds.extend((len(fshape), len(sshape)))
            add_shape(fshape)
            add_shape(sshape)
        self.out_const = tuple(consts)
        self.out_tid = self._table([o[1] for o in outputs])
        self.out_type = self._table(types)
        self.out_nbytes = self._table(nbytes)
        self.out_nd = self._table(nds)
        self.shapes = self._table(shapes)
        self.in_shape_at = self._table(shape_at[:2 * self.n_in])
        self.out_shape_at = self._table(shape_at[2 * self.n_in:])
        for t in range(n):  # every tensor bound now or per call: an unbound one would be a NULL dereference
            if t not in bound:
                raise EngineError(f"GraphStep: tensor {t} of the program is not bound")

    def __dealloc__(self):
        free(self.car_data)

    cdef int64_t *_table(self, values) except NULL:
        """An int64 table kept alive by this object (its address stays valid)."""
        cdef cnp.ndarray a = _i64(values)
        self.tables.append(a)
        return <int64_t *>cnp.PyArray_DATA(a)

    cdef inline bint _shape_fits(self, cnp.ndarray a, int64_t i, int mode):
        """Has a exactly input i's shape in this mode?"""
        cdef int64_t nd = self.in_nd[2 * i + mode], k
        cdef const int64_t *shape = self.shapes + self.in_shape_at[2 * i + mode]
        if cnp.PyArray_NDIM(a) != nd:
            return False
        cdef cnp.npy_intp *dims = cnp.PyArray_DIMS(a)
        for k in range(nd):
            if dims[k] != shape[k]:
                return False
        return True

    cdef object _converted(self, object obj, int64_t i, int mode):
        """obj converted to input i's dtype in C order (a new array), when only its dtype, byte
        order or memory layout keep it from being run as it is, and the checked path would
        convert it the same way (GraphModel._check_feeds: a number of the same kind, or an
        unsigned integer for a signed one; astype, then C order); else None. A conversion that
        could change a value (integers narrowed: the checked path range-checks them; floats
        narrowed past their range) is left to the checked path, which refuses it by name."""
        if not cnp.PyArray_CheckExact(obj) or not self._shape_fits(<cnp.ndarray>obj, i, mode):
            return None
        want = self.in_dtypes[i]
        got = (<cnp.ndarray>obj).dtype
        if got.kind != want.kind and not (want.kind == "i" and got.kind == "u"):
            return None
        if got == want:  # (np.asarray with order="C": ascontiguousarray would make rank 0 rank 1)
            return np.asarray(obj, order="C")
        if np.can_cast(got, want, "safe"):
            return np.asarray(obj.astype(want), order="C")
        if got.kind == "f":  # float64 fed to a float32 input: rounded, unless a value overflows
            with np.errstate(over="ignore"):
                new = obj.astype(want)
            return np.asarray(new, order="C") if np.array_equal(np.isfinite(new), np.isfinite(obj)) else None
        return None

    cdef inline void *_fits(self, object obj, int64_t i, int mode):
        """obj's data when it is an ndarray of exactly input i's shape (in this mode), dtype
        and C order, with token ids inside the vocabulary; else NULL. (Bound by the caller once
        it holds the stream's lock: another thread's run may be reading the table.)"""
        if not cnp.PyArray_CheckExact(obj):
            return NULL
        cdef cnp.ndarray a = <cnp.ndarray>obj
        cdef int64_t k, n, v
        cdef int t = cnp.PyArray_TYPE(a)
        if not cnp.PyArray_IS_C_CONTIGUOUS(a) or not cnp.PyArray_ISNOTSWAPPED(a):
            return NULL
        if t != self.in_type[i] and not cnp.PyArray_EquivTypenums(t, <int>self.in_type[i]):
            return NULL
        if not self._shape_fits(a, i, mode):
            return NULL
        cdef void *data = cnp.PyArray_DATA(a)
        cdef int64_t vocab = self.in_vocab[i]
        if vocab > 0:  # token ids: outside -vocab..vocab-1 the checked path words the error
            n = self.in_nbytes[i] // cnp.PyArray_ITEMSIZE(a)
            if cnp.PyArray_ITEMSIZE(a) == 8:
                for k in range(n):
                    v = (<const int64_t *>data)[k]
                    if v < -vocab or v >= vocab:
                        return NULL
            else:
                for k in range(n):
                    v = (<const int32_t *>data)[k]
                    if v < -vocab or v >= vocab:
                        return NULL
        return data

    cdef int _file_changed(self) except -1:
        """1 when the mapped weight file's size or time differ from when it was opened (the
        caller then lets WeightFile.check_unchanged raise), else 0; as that method, a closed
        file is not checked."""
        wf = self.mapped_file
        if wf.derived_checks:  # files mapped beside it (a panel cache): Python's check covers them all
            wf.check_unchanged()
            return 0
        fd = wf._fd
        if fd is None:
            return 0
        cdef long long size = 0, mtime = 0
        if rnn_py_fstat(<int>fd, &size, &mtime) != 0:
            wf.check_unchanged()  # fstat failed, or no nanosecond time here: Python's check decides
            return 0
        size0, mtime0 = wf._stat
        return 0 if (size == size0 and mtime == mtime0) else 1

    cdef object _stream(self):
        """The stream (None once it is gone)."""
        cdef PyObject *p = PyWeakref_GetObject(self.stream_ref)
        return None if <object>p is None else <object>p

    cdef dict _run(self, stream, const uint8_t *want, int mode):
        """Binds the state buffers, runs the program (GIL released) and returns copies of the
        outputs (all, or those flagged in want) in this mode's shapes; then the state buffers
        swap roles and the stream's carried dict names the new state."""
        cdef int64_t j, o, tid
        cdef int cur = self.cur
        cdef void **ptrs = self.ptrs
        for j in range(self.n_car):
            ptrs[self.car_in_tid[j]] = self.car_data[2 * j + cur]
            if self.car_out_tid[j] >= 0:
                ptrs[self.car_out_tid[j]] = self.car_data[2 * j + 1 - cur]
        cdef int threads = 1
        t = self.model.threads
        if t is not None and t > 1:
            threads = t
        cdef Program P = self.program
        cdef char err[256]
        err[0] = 0
        cdef const int64_t *prog = <const int64_t *>cnp.PyArray_DATA(P.program)
        cdef const int64_t *ip = <const int64_t *>cnp.PyArray_DATA(P.iparams)
        cdef const float *fp = <const float *>cnp.PyArray_DATA(P.fparams)
        cdef rnn_status st = RNN_STATUS_OK
        cdef int64_t failed = -1
        if P.n_instr:
            with nogil:
                st = rnn_graph_run_threads(prog, P.n_instr, ip, fp, ptrs, P.stack_ptrs, self.work, err, 256, &failed,
                                           threads)
        if st != RNN_STATUS_OK:
            msg = err.decode("utf-8", "replace") if err[0] else rnn_status_string(st).decode()
            if P.labels is not None and 0 <= failed < len(P.labels) and P.labels[failed]:
                msg = f"{P.labels[failed]}: {msg}"
            raise GraphRunError(msg)
        cdef dict res = {}
        cdef cnp.ndarray arr
        cdef const void *src
        cdef cnp.npy_intp dims[64]
        cdef int64_t nd, k
        cdef const int64_t *shape
        for o in range(self.n_out):
            if want != NULL and not want[o]:
                continue
            tid = self.out_tid[o]
            src = ptrs[tid] if tid >= 0 else cnp.PyArray_DATA(<cnp.ndarray>self.out_const[o])
            nd = self.out_nd[2 * o + mode]
            shape = self.shapes + self.out_shape_at[2 * o + mode]
            for k in range(nd):
                dims[k] = shape[k]
            arr = <cnp.ndarray>cnp.PyArray_EMPTY(<int>nd, dims, <int>self.out_type[o], 0)
            memcpy(cnp.PyArray_DATA(arr), src, self.out_nbytes[o])
            res[self.out_names[o]] = arr
        for j in range(self.n_car):  # states the program did not write in place: copied
            if self.car_out_tid[j] < 0:
                tid = self.car_src_tid[j]
                src = ptrs[tid] if tid >= 0 else cnp.PyArray_DATA(<cnp.ndarray>self.car_src_const[j])
                memcpy(self.car_data[2 * j + 1 - cur], src, self.car_nbytes[j])
        self.cur = 1 - cur
        carried = stream._carried
        for j in range(self.n_car):
            PyDict_SetItem(carried, self.car_names[j], self.car_bufs[j][1 - cur])
        return res

    def run(self, dict feeds, want=None):
        """The checked path's run: ``feeds`` holds every input (data and explicit state) as
        the stream checked it, of the shapes the plan was made for; the layer states are the
        stream's current vectors. The caller holds the stream's busy lock. Returns {output:
        new array} for the names in ``want`` (all when None), in the shapes feed() gives."""
        cdef int64_t i, j
        cdef cnp.ndarray a
        cdef void *data
        stream = self._stream()
        if stream is None:
            raise EngineError("GraphStep.run: the stream is gone")
        for i in range(self.n_in):
            obj = feeds[self.in_names[i]]
            data = self._fits(obj, i, 0)
            if data != NULL:
                self.ptrs[self.in_tid[i]] = data
            else:
                a = np.asarray(obj, order="C")
                if a.nbytes != self.in_nbytes[i] or a.dtype.num != self.in_type[i] and \
                        not cnp.PyArray_EquivTypenums(a.dtype.num, <int>self.in_type[i]):
                    raise EngineError(f"GraphStep.run: input {self.in_names[i]!r} does not fit the plan")
                self.ptrs[self.in_tid[i]] = cnp.PyArray_DATA(a)  # (token ids checked by the caller)
                feeds[self.in_names[i]] = a  # kept alive by the caller's dict during the run
        carried = stream._carried
        for j in range(self.n_car):  # a state set from outside (set_state, the batcher): copied in
            cur = self.car_bufs[j][self.cur]
            given = carried[self.car_names[j]]
            if given is not cur:
                if np.shape(given) != cur.shape:
                    raise EngineError(f"GraphStep.run: state {self.car_names[j]!r} of shape {np.shape(given)}, "
                                      f"the plan carries {cur.shape}")
                np.copyto(cur, given)
                carried[self.car_names[j]] = cur
        layers = stream._layer_state
        for j in range(self.n_ls):
            a = layers[self.ls_keys[j]]
            if not (a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
                    and a.size == self.ls_floats[j]):
                raise EngineError(f"GraphStep.run: layer state {self.ls_keys[j]!r} is not a writeable float32 "
                                  f"vector of {self.ls_floats[j]}")
            self.ptrs[self.ls_tid[j]] = cnp.PyArray_DATA(a)
            self.ls_arrs[j] = a
        if want is None:
            return self._run(stream, NULL, 0)
        mask = np.zeros(max(1, self.n_out), np.uint8)
        for name in want:
            mask[self.out_index[name]] = 1
        return self._run(stream, <const uint8_t *>cnp.PyArray_DATA(mask), 0)

    def call(self, inputs, outputs, bint step):
        """The fast path of feed() (step False) and step() (True): their result, or None when
        this call is not one this object runs (see the class doc)."""
        cdef int mode = 1 if step else 0
        cdef int64_t i, j, k
        cdef PyObject *p
        if step and not self.step_ok:
            return None
        cdef bint as_dict = type(inputs) is dict
        cdef void *data[64]
        cdef list refs = None  # the arrays run, held (the caller's dict may change meanwhile)
        if as_dict:
            if PyDict_Size(inputs) != self.n_in or self.n_in > 64:
                return None
            refs = []
            for i in range(self.n_in):
                p = PyDict_GetItem(inputs, self.in_names[i])
                if p == NULL:
                    return None
                obj = <object>p
                data[i] = self._fits(obj, i, mode)
                if data[i] == NULL:  # another dtype or layout: converted as the checked path would
                    obj = self._converted(obj, i, mode)
                    if obj is None:
                        return None
                    data[i] = self._fits(obj, i, mode)
                    if data[i] == NULL:
                        return None
                refs.append(obj)
        elif self.n_in == 1:
            data[0] = self._fits(inputs, 0, mode)
            if data[0] == NULL:
                refs = [self._converted(inputs, 0, mode)]
                if refs[0] is None:
                    return None
                data[0] = self._fits(refs[0], 0, mode)
                if data[0] == NULL:
                    return None
        else:
            return None
        if self.track_last and step:
            return None  # finish() needs the chunk-shaped inputs: the checked path keeps them
        # the state bound last must still be the stream's (set_state, reset and the batcher replace it)
        s = self._stream()
        if s is None:
            return None
        carried = s._carried
        for j in range(self.n_car):
            p = PyDict_GetItem(carried, self.car_names[j])
            if p == NULL or <object>p is not self.car_bufs[j][self.cur]:
                return None
        layers = s._layer_state
        for j in range(self.n_ls):
            p = PyDict_GetItem(layers, self.ls_keys[j])
            if p == NULL or <object>p is not self.ls_arrs[j]:
                return None
        cdef uint8_t want[256]
        cdef const uint8_t *wp = NULL
        if outputs is not None:
            if self.n_out > 256:
                return None
            for k in range(self.n_out):
                want[k] = 0
            for name in outputs:
                p = PyDict_GetItem(self.out_index, name) if type(name) is str else NULL
                if p == NULL:
                    return None  # unknown: the checked path names it
                want[<int64_t><object>p] = 1
            wp = want
        if self.mapped_file is not None and self._file_changed():
            self.mapped_file.check_unchanged()  # raises FormatError naming the file
            return None
        if not self.acquire(False):
            return None  # another thread's call is running: the checked path raises
        try:
            for i in range(self.n_in):
                self.ptrs[self.in_tid[i]] = data[i]
            res = self._run(s, wp, mode)
        finally:
            self.release()
        s._array_io = not as_dict
        if self.track_last:  # finish() repeats the last chunk's other axes (feed mode only)
            last = {self.in_names[i]: (refs[i] if refs is not None else inputs) for i in range(self.n_in)}
            for j in range(self.n_car):
                last[self.car_names[j]] = self.car_bufs[j][self.cur]
            s._last = last
        if as_dict:
            return res
        names = self.model_outputs if outputs is None else list(outputs)
        vals = tuple([res[n] for n in names if n in res])
        return vals[0] if len(vals) == 1 else vals


# --- training (src_c/lstm.c, gru.c, rnn.c, train.c) --------------------------------------------
# Thin wrappers: rnnengine.train validates shapes and owns every buffer; these check what the
# C code relies on (dtype, contiguity, sizes) and release the GIL around the loops.

cdef float *_fptr(object a, int64_t n, str what) except? NULL:
    if a is None:
        return NULL
    if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous):
        raise TypeError(f"{what} must be a C-contiguous float32 array")
    if a.size < n:
        raise ValueError(f"{what} has {a.size} floats, needs {n}")
    return <float *>cnp.PyArray_DATA(<cnp.ndarray>a)


cdef void _cell_from(rnn_train_cell *c, dict spec) except *:
    c.kind = CELL_KINDS[spec["kind"]]
    c.input_size = spec["I"]
    c.hidden_size = spec["H"]
    c.linear_before_reset = spec.get("linear_before_reset", 0)
    c.relu = spec.get("relu", 0)
    c.has_clip = spec.get("clip") is not None
    c.clip = spec["clip"] if spec.get("clip") is not None else 0.0
    G = GATES[spec["kind"]]
    H, I = spec["H"], spec["I"]
    c.W = _fptr(spec["W"], G * H * I, "W")
    c.R = _fptr(spec["R"], G * H * H, "R")
    c.B = _fptr(spec.get("B"), 2 * G * H, "B")
    c.P = _fptr(spec.get("P"), 3 * H, "P")
    c.x_projected = 1 if spec.get("x_projected") else 0


cdef int64_t _x_cols(dict spec):
    """Floats per row of X (and dX): I, or G*H when X is the caller's input product."""
    return GATES[spec["kind"]] * spec["H"] if spec.get("x_projected") else spec["I"]


def train_packed_gemm_repeat(const float[:, ::1] A, const float[:, ::1] B, float[:, ::1] C, int64_t repeat):
    """C = A @ B.T `repeat` times with B packed once (as a training pass packs R once for its
    T per-step products); for benchmarks/bench_train.py --why (the kernel's rate alone)."""
    if A.shape[1] != B.shape[1] or C.shape[0] != A.shape[0] or C.shape[1] != B.shape[0]:
        raise ValueError("train_packed_gemm_repeat: A (M, K), B (N, K) and C (M, N) do not match")
    cdef int64_t M = A.shape[0], N = B.shape[0], K = A.shape[1], i
    cdef rnn_packed p
    _check(rnn_packed_init_dtype(&p, &B[0, 0], N, K, K, WEIGHT_DTYPES["float32"]), "packing")
    with nogil:
        for i in range(repeat):
            rnn_gemm_packed(M, &A[0, 0], K, &p, &C[0, 0], N, 0)
    rnn_packed_free(&p)


def train_sizes(dict spec, int64_t T, int64_t B):
    """(saved floats, work floats) for a forward/backward pair over T steps of B rows."""
    cdef rnn_train_cell c
    _cell_from(&c, spec)
    return rnn_train_saved_floats(&c, T, B), rnn_train_work_floats(&c, T, B)


def train_forward(dict spec, X, h0, c0, Y, hT, cT, saved, work):
    cdef rnn_train_cell c
    _cell_from(&c, spec)
    cdef int64_t T = X.shape[0], B = X.shape[1], H = spec["H"]
    cdef const float *xp = _fptr(X, T * B * _x_cols(spec), "X")
    cdef const float *h0p = _fptr(h0, B * H, "h0")
    cdef const float *c0p = _fptr(c0, B * H, "c0")
    cdef float *yp = _fptr(Y, T * B * H, "Y")
    cdef float *hp = _fptr(hT, B * H, "hT")
    cdef float *cp = _fptr(cT, B * H, "cT")
    cdef float *sp = _fptr(saved, rnn_train_saved_floats(&c, T, B), "saved")
    cdef float *wp = _fptr(work, rnn_train_work_floats(&c, T, B), "work")
    cdef rnn_status st
    with nogil:
        st = rnn_train_forward(&c, T, B, xp, h0p, c0p, yp, hp, cp, sp, wp)
    _check(st, "train_forward")


def train_backward(dict spec, X, h0, c0, Y, saved, dY, dhT, dcT, dX, dW, dR, dB, dP, dh0, dc0, work):
    cdef rnn_train_cell c
    _cell_from(&c, spec)
    cdef int64_t T = X.shape[0], B = X.shape[1], H = spec["H"], I = spec["I"]
    cdef int64_t G = GATES[spec["kind"]]
    cdef const float *xp = _fptr(X, T * B * _x_cols(spec), "X")
    cdef const float *h0p = _fptr(h0, B * H, "h0")
    cdef const float *c0p = _fptr(c0, B * H, "c0")
    cdef const float *yp = _fptr(Y, T * B * H, "Y")
    cdef const float *sp = _fptr(saved, rnn_train_saved_floats(&c, T, B), "saved")
    cdef const float *dyp = _fptr(dY, T * B * H, "dY")
    cdef const float *dhp = _fptr(dhT, B * H, "dhT")
    cdef const float *dcp = _fptr(dcT, B * H, "dcT")
    cdef float *dxp = _fptr(dX, T * B * _x_cols(spec), "dX")
    cdef float *dwp = _fptr(dW, G * H * I, "dW")
    cdef float *drp = _fptr(dR, G * H * H, "dR")
    cdef float *dbp = _fptr(dB, 2 * G * H, "dB")
    cdef float *dpp = _fptr(dP, 3 * H, "dP")
    cdef float *dh0p = _fptr(dh0, B * H, "dh0")
    cdef float *dc0p = _fptr(dc0, B * H, "dc0")
    cdef float *wp = _fptr(work, rnn_train_work_floats(&c, T, B), "work")
    cdef rnn_status st
    with nogil:
        st = rnn_train_backward(&c, T, B, xp, h0p, c0p, yp, sp, dyp, dhp, dcp, dxp, dwp, drp, dbp, dpp,
                                dh0p, dc0p, wp)
    _check(st, "train_backward")


def dense_forward(X, W, b, Y):
    cdef int64_t N = X.shape[0], K = X.shape[1], O = W.shape[0]
    cdef const float *xp = _fptr(X, N * K, "X")
    cdef const float *wp = _fptr(W, O * K, "W")
    cdef const float *bp = _fptr(b, O, "b")
    cdef float *yp = _fptr(Y, N * O, "Y")
    with nogil:
        rnn_dense_forward(N, K, O, xp, wp, bp, yp)


def dense_backward(X, W, dY, dW, db, dX):
    cdef int64_t N = X.shape[0], K = X.shape[1], O = W.shape[0]
    cdef const float *xp = _fptr(X, N * K, "X")
    cdef const float *wp = _fptr(W, O * K, "W")
    cdef const float *dyp = _fptr(dY, N * O, "dY")
    cdef float *dwp = _fptr(dW, O * K, "dW")
    cdef float *dbp = _fptr(db, O, "db")
    cdef float *dxp = _fptr(dX, N * K, "dX")
    with nogil:
        rnn_dense_backward(N, K, O, xp, wp, dyp, dwp, dbp, dxp)


def softmax_xent(logits, cnp.ndarray targets, dlogits):
    cdef int64_t N = logits.shape[0], C = logits.shape[1]
    if targets.dtype != np.int32 or not targets.flags.c_contiguous or targets.size != N:
        raise TypeError("targets must be a C-contiguous int32 array of one class per row")
    cdef const float *lp = _fptr(logits, N * C, "logits")
    cdef float *dp = _fptr(dlogits, N * C, "dlogits")
    cdef const int32_t *tp = <const int32_t *>cnp.PyArray_DATA(targets)
    cdef double loss
    with nogil:
        loss = rnn_softmax_xent(N, C, lp, tp, dp)
    if loss < 0:
        raise ValueError(f"a target class is >= the number of classes {C}")
    return loss


def mse(y, t, dy):
    cdef int64_t N = y.shape[0], D = y.size // max(1, y.shape[0])
    cdef const float *yp = _fptr(y, N * D, "y")
    cdef const float *tp = _fptr(t, N * D, "targets")
    cdef float *dp = _fptr(dy, N * D, "dy")
    cdef double loss
    with nogil:
        loss = rnn_mse(N, D, yp, tp, dp)
    return loss


def embedding_forward(cnp.ndarray ids, table, out):
    cdef int64_t N = ids.size, V = table.shape[0], E = table.shape[1]
    if ids.dtype != np.int32 or not ids.flags.c_contiguous:
        raise TypeError("ids must be a C-contiguous int32 array")
    cdef const int32_t *ip = <const int32_t *>cnp.PyArray_DATA(ids)
    cdef const float *tp = _fptr(table, V * E, "table")
    cdef float *op = _fptr(out, N * E, "out")
    cdef int r
    with nogil:
        r = rnn_embedding_forward(N, V, E, ip, tp, op)
    if r:
        raise ValueError(f"a token id lies outside the vocabulary [0, {V})")


def embedding_backward(cnp.ndarray ids, dout, dtable):
    cdef int64_t N = ids.size, V = dtable.shape[0], E = dtable.shape[1]
    if ids.dtype != np.int32 or not ids.flags.c_contiguous:
        raise TypeError("ids must be a C-contiguous int32 array")
    cdef const int32_t *ip = <const int32_t *>cnp.PyArray_DATA(ids)
    cdef const float *dp = _fptr(dout, N * E, "dout")
    cdef float *tp = _fptr(dtable, V * E, "dtable")
    cdef int r
    with nogil:
        r = rnn_embedding_backward(N, V, E, ip, dp, tp)
    if r:
        raise ValueError(f"a token id lies outside the vocabulary [0, {V})")


def clip_grad_norm(g, double max_norm):
    cdef float *gp = _fptr(g, g.size, "g")
    cdef int64_t n = g.size
    cdef double norm
    with nogil:
        norm = rnn_clip_grad_norm(n, gp, max_norm)
    return norm


def sgd_step(w, g, v, float lr, float momentum, float weight_decay):
    cdef int64_t n = w.size
    cdef float *wp = _fptr(w, n, "w")
    cdef const float *gp = _fptr(g, n, "g")
    cdef float *vp = _fptr(v, n, "v")
    with nogil:
        rnn_sgd_step(n, wp, gp, vp, lr, momentum, weight_decay)


def adam_step(w, g, m, v, int64_t t, float lr, float beta1, float beta2, float eps, float weight_decay):
    cdef int64_t n = w.size
    cdef float *wp = _fptr(w, n, "w")
    cdef const float *gp = _fptr(g, n, "g")
    cdef float *mp = _fptr(m, n, "m")
    cdef float *vp = _fptr(v, n, "v")
    with nogil:
        rnn_adam_step(n, wp, gp, mp, vp, t, lr, beta1, beta2, eps, weight_decay)
