"""The numbers Python shares with the C core agree with src_c/rnnengine.h: rnnengine/codes.py
(the one Python definition) against the header's text and against the values the C compiler gave
the extension (_core.C_CONSTANTS), so a change on one side alone fails here; the tables built
on them name the right codes; and no module keeps a copy of its own."""
import ast
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from rnnengine import _core
from rnnengine import codes
from rnnengine.ops import handlers
from rnnengine.runtime import layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "src_c", "rnnengine.h")
PACKAGE = os.path.join(ROOT, "rnnengine")


def header_constants(text):
    """Every enum member (with its value, explicit or counted on) and every integer #define
    RNN_* of a C header."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    out = {}
    for body in re.findall(r"typedef\s+enum\s*\{(.*?)\}\s*\w+\s*;", text, flags=re.S):
        value = -1
        for item in filter(None, (part.strip() for part in body.split(","))):
            m = re.fullmatch(r"(\w+)(?:\s*=\s*(-?\d+))?", item)
            assert m, f"cannot read the enum member {item!r}"
            value = int(m.group(2)) if m.group(2) is not None else value + 1
            out[m.group(1)] = value
    for name, value in re.findall(r"^\s*#\s*define\s+(RNN_\w+)\s+(-?\d+)\s*$", text, flags=re.M):
        out[name] = int(value)
    return out


@pytest.fixture(scope="module")
def header():
    with open(HEADER) as f:
        return header_constants(f.read())


def test_the_header_reader_reads_what_it_should():
    got = header_constants("typedef enum { A = 3, B, /* c */ C = 7 } e; // x\n#define RNN_W 16\n"
                           "typedef enum {\n  D = 0, /* d */\n  E = 1  /* e */\n} f;")
    assert got == {"A": 3, "B": 4, "C": 7, "D": 0, "E": 1, "RNN_W": 16}


def test_python_constants_equal_the_header(header):
    py = codes.c_constants()
    assert sorted(set(header) - set(py)) == [], "in rnnengine.h, missing from rnnengine/codes.py"
    assert sorted(set(py) - set(header)) == [], "in rnnengine/codes.py, not in rnnengine.h"
    assert {k: v for k, v in py.items() if header[k] != v} == {}, "values differ from rnnengine.h"
    assert len(py) >= 88  # every enum of the header, not a few


def test_compiled_constants_equal_the_header(header):
    """_core.C_CONSTANTS holds the values the C compiler gave the names (declared in _core.pxd)."""
    compiled = _core.C_CONSTANTS
    differ = {k: (compiled.get(k), header.get(k)) for k in set(compiled) | set(header)
              if compiled.get(k) != header.get(k)}
    assert differ == {}, "name: (compiled value, header value); rebuild the extension or update _core.pxd"
    assert _core.INSTR_WORDS == codes.INSTR_WORDS


def test_a_change_on_one_side_alone_is_seen(header):
    """The comparison above fails when the header moves without Python (and the reverse)."""
    with open(HEADER) as f:
        text = f.read()
    moved = header_constants(text.replace("RNN_OP_REVSEQ = 19", "RNN_OP_REVSEQ = 20"))
    assert moved != codes.c_constants()
    added = header_constants(text.replace("RNN_REDUCE_PROD = 4", "RNN_REDUCE_PROD = 4,\n RNN_REDUCE_L2 = 5"))
    assert set(added) - set(codes.c_constants()) == {"RNN_REDUCE_L2"}


def test_tables_are_built_from_the_constants():
    c = codes
    assert c.CELL_KINDS == {"RNN": c.CELL_RNN, "GRU": c.CELL_GRU, "LSTM": c.CELL_LSTM}
    assert c.DIRECTIONS == {"forward": c.DIR_FORWARD, "reverse": c.DIR_REVERSE,
                            "bidirectional": c.DIR_BIDIRECTIONAL}
    assert c.WEIGHT_DTYPES == {"float32": c.WEIGHTS_F32, "float16": c.WEIGHTS_F16, "int8": c.WEIGHTS_I8}
    assert c.GATES == {"RNN": 1, "GRU": 3, "LSTM": 4}
    assert {np.dtype(t).name: code for t, code in c.TENSOR_DTYPES.items()} == {
        "float32": c.DT_F32, "int64": c.DT_I64, "int32": c.DT_I32, "uint8": c.DT_U8, "bool": c.DT_BOOL}
    assert c.tensor_code(np.float64) == c.DT_OTHER + 8 and c.tensor_code(np.int8) == c.DT_OTHER + 1
    assert c.tensor_code(np.int32) == c.DT_I32
    assert _core.tensor_code is c.tensor_code
    assert c.RECURRENT_INPUTS[c.SLOT_W] == "W" and c.RECURRENT_INPUTS[c.SLOT_R] == "R"
    assert c.RECURRENT_INPUTS[c.SLOT_B] == "B" and c.RECURRENT_INPUTS[c.SLOT_SEQUENCE_LENS] == "sequence_lens"
    assert c.RECURRENT_INPUTS[c.SLOT_INITIAL_H] == "initial_h" and c.RECURRENT_INPUTS[c.SLOT_INITIAL_C] == "initial_c"
    assert c.RECURRENT_INPUTS[c.SLOT_P] == "P" and c.RECURRENT_INPUTS[c.SLOT_X] == "X"
    assert c.recurrent_attrs("GRU") == c.RECURRENT_COMMON_ATTRS | {"linear_before_reset"}
    assert set(c.RECURRENT_ATTRS) == c.recurrent_attrs("LSTM") | c.recurrent_attrs("GRU")


def _snake(name):
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


def test_op_tables_name_the_codes_of_their_ops():
    """Each op's code is the C constant named after the op (Relu -> RNN_ACT_RELU, ReduceMean ->
    RNN_REDUCE_MEAN, LessOrEqual -> RNN_BIN_LESS_EQUAL), so a table cannot point one op at
    another's function."""
    cc = codes.c_constants()
    for name, (kind, *_rest) in layers.ACTIVATIONS.items():
        assert cc["RNN_ACT_" + _snake(name)] == kind, name
    for name, (kind, *_rest) in handlers.UNARY.items():
        assert kind in (cc.get("RNN_ACT_" + _snake(name)), cc.get("RNN_UNARY_" + _snake(name))), name
    for name, (kind, _fn) in handlers.BINARY.items():
        assert cc["RNN_BIN_" + _snake(name)] == kind, name
    for name, kind in handlers.TBINARY_KIND.items():
        assert cc["RNN_BIN_" + _snake(name)] == kind, name
    for name, kind in handlers.COMPARE_KIND.items():
        assert cc["RNN_BIN_" + _snake(name.replace("OrEqual", "Equal"))] == kind, name
    for name, kind in handlers.REDUCE.items():
        assert cc["RNN_" + _snake(name)] == kind, name


@pytest.mark.parametrize("kind, fn", [(codes.BIN_SUB, np.subtract), (codes.BIN_DIV, np.divide),
                                      (codes.BIN_POW, np.power), (codes.BIN_MIN, np.minimum)])
def test_binary_codes_run_their_function_in_c(kind, fn):
    """The names mean in C what they say: one BINARY instruction per code, against NumPy."""
    rng = np.random.default_rng(kind)
    a = rng.uniform(0.5, 2.0, 7).astype(np.float32)
    b = rng.uniform(0.5, 2.0, 7).astype(np.float32)
    out = np.zeros(7, np.float32)
    word = [codes.OP_BINARY, 0, 1, -1, -1, 2, -1, -1, -1, 0, 5, 0, 0] + [-1] * (codes.INSTR_WORDS - 13)
    ip = [kind, 1, 7, 1, 1]
    prog = _core.Program(np.array([word], np.int64), np.array(ip, np.int64), np.zeros(0, np.float32), [],
                         tensor_dtypes=[codes.DT_F32] * 3, tensor_counts=[7, 7, 7], work_floats=16)
    ptrs = np.array([_core.address(a), _core.address(b), _core.address(out)], np.int64)
    prog.run(ptrs, np.zeros(16, np.float32))
    np.testing.assert_allclose(out, fn(a, b).astype(np.float32), rtol=1e-6)


def test_codes_import_without_the_compiled_core():
    """codes.py is pure Python: it imports (from the source tree) with rnnengine._core blocked."""
    script = ("import sys\n"
              "class Block:\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name == 'rnnengine._core': raise ImportError('blocked')\n"
              "sys.meta_path.insert(0, Block())\n"
              "from rnnengine import codes\n"
              "assert 'rnnengine._core' not in sys.modules\n"
              "print(codes.OP_REVSEQ)\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "19"


# literal copies of the shared tables that must not come back outside codes.py
COPIES = [
    (r'"LSTM":\s*4\b|"GRU":\s*3\b|"RNN":\s*1\b', "the gates per cell kind (codes.GATES)"),
    (r'"RNN":\s*0\b|"LSTM":\s*2\b', "the cell kind codes (codes.CELL_KINDS)"),
    (r'"bidirectional":\s*2\b', "the direction codes (codes.DIRECTIONS)"),
    (r'"float16":\s*1\b|"int8":\s*2\b', "the weight dtype codes (codes.WEIGHT_DTYPES)"),
    (r'np\.dtype\(np\.float32\):\s*0', "the tensor element type codes (codes.TENSOR_DTYPES)"),
    (r'=\s*range\(20\)', "the op codes (codes.OP_*)"),
    (r'"sequence_lens",\s*"initial_h"', "the recurrent inputs (codes.RECURRENT_INPUTS)"),
    (r'"input_forget"\},\s*"GRU"', "the recurrent attributes (codes.recurrent_attrs)"),
    (r'\b1:\s*np\.float32,\s*2:\s*np\.uint8', "the ONNX element types (codes.ONNX_DTYPE)"),
    (r'"float32":\s*np\.float32,\s*"int64"', "the dtype names (codes.NP_DTYPES)"),
]


def test_no_module_keeps_its_own_copy():
    found = []
    for folder, _dirs, files in os.walk(PACKAGE):
        for f in files:
            if not f.endswith((".py", ".pyx")) or f == "codes.py":
                continue
            path = os.path.join(folder, f)
            with open(path) as fh:
                text = fh.read()
            for pattern, what in COPIES:
                for m in re.finditer(pattern, text):
                    line = text.count("\n", 0, m.start()) + 1
                    found.append(f"{os.path.relpath(path, ROOT)}:{line}: a copy of {what}")
    assert found == []


def test_codes_module_imports_only_the_standard_library_and_numpy():
    with open(codes.__file__) as f:
        tree = ast.parse(f.read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    assert roots <= {"__future__", "typing", "numpy"}


def _stub_names(body):
    names = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom):
            names |= {a.asname for a in node.names if a.asname == a.name}  # explicit re-exports
    return {n for n in names if not n.startswith("_")}


def test_core_stub_lists_every_public_name_of_the_extension():
    """rnnengine/_core.pyi (what type checkers see) names exactly the public functions,
    classes and constants of the compiled module, and each class's public methods and
    attributes (signatures: `python -m mypy.stubtest rnnengine._core`)."""
    import types
    with open(os.path.join(PACKAGE, "_core.pyi")) as f:
        tree = ast.parse(f.read())
    runtime = {n for n, v in vars(_core).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert _stub_names(tree.body) == runtime
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        members = {n for n in dir(getattr(_core, cls.name)) if not n.startswith("_")}
        assert _stub_names(cls.body) == members, cls.name
