"""The exported-model corpus (tests/data/corpus, made by tools/make_corpus.py from PyTorch's
two exporters and, where TensorFlow installs, Keras through tf2onnx): every file converts,
matches onnxruntime whole-sequence and streamed, and survives the weight file at float32
(bitwise), float16 and int8 (within the documented bounds)."""
import json
import os

import pytest

import rnnengine
from rnnengine.frontend.converter import ConversionError
from rnnengine.verify import TOLERANCE, verify

HERE = os.path.join(os.path.dirname(__file__), "data", "corpus")
MANIFEST = os.path.join(HERE, "manifest.json")
ENTRIES = json.load(open(MANIFEST))["models"] if os.path.exists(MANIFEST) else []
REPORT = {}


def dims_of(entry):
    """Symbolic dimensions at the sizes the model was exported with: some exporters bake the
    example sizes into Reshape targets (the dynamo exporter does for bidirectional GRUs), so
    other sizes would fail in onnxruntime too."""
    dims = {}
    for spec in entry["inputs"]:
        for d, n in zip(spec["shape"], spec.get("example_shape", [])):
            if isinstance(d, str) and d:
                dims[d] = n
    return dims


def _ids(e):
    return e["file"].rsplit(".", 1)[0]


def test_corpus_is_present():
    assert len(ENTRIES) >= 10, "tests/data/corpus/manifest.json is missing or small: run tools/make_corpus.py"


@pytest.mark.parametrize("entry", ENTRIES, ids=_ids)
def test_corpus_model_converts_and_matches_onnxruntime(entry, tmp_path):
    from rnnengine.format.store import load, save
    path = os.path.join(HERE, entry["file"])
    if entry.get("convert", {}).get("expect") == "refuse":  # an invalid export: refused by name
        with pytest.raises(ConversionError, match=r"node '.+'"):
            rnnengine.convert(path)
        return
    model = rnnengine.convert(path)
    DIMS = dims_of(entry)
    # streamed in chunks of 1, 2, 3 and 7 steps and the whole length at once
    rep = verify(model, path, DIMS, seed=1, chunks=(1, 2, 3, 7, 10 ** 6))
    worst = max(e["rel"] for e in rep["whole"].values())
    assert worst <= TOLERANCE["float32"], rep["whole"]
    expect = entry.get("streaming", {}).get("expect")
    if rep["stream"] is None:
        # only what the streaming rule refuses (layers that need the whole sequence, pooling over
        # time...), or an exporter that unrolled the time loop for a fixed length (recorded in
        # the manifest), may make a model unstreamable; the refusal names the node and why
        if "fixed_time" in entry and "no time axis" in rep["stream_note"]:
            pass
        else:
            assert rep["stream_note"].startswith("not streamable: "), rep["stream_note"]
            assert expect in (None, "refuse"), (expect, rep["stream_note"])
            if expect is None:
                assert any(why in rep["stream_note"] for why in ("reverse", "bidirectional", "order computed from "
                                                                 "the data")), rep["stream_note"]
        sworst = None
    else:
        assert expect in (None, "stream"), (expect, rep["stream_note"])
        sworst = max(e["rel"] for e in rep["stream"].values())
        assert sworst <= TOLERANCE["float32"], (rep["stream_note"], rep["stream"])
    # the weight file: float32 reproduces the conversion exactly; float16 / int8 stay in bounds
    sizes = {"onnx": os.path.getsize(path)}
    for dtype in ("float32", "float16", "int8"):
        out = tmp_path / f"m.{dtype}.rnne"
        save(model, str(out), dtype)
        sizes[dtype] = os.path.getsize(out)
        loaded = load(str(out))
        rep2 = verify(loaded, path, DIMS, seed=1, chunks=(3,), ref=model)
        err = max(e["rel"] for e in rep2["vs_float32"].values())
        if dtype == "float32":
            assert err == 0.0
        else:
            assert err <= TOLERANCE[dtype], (dtype, rep2["vs_float32"])
    assert sizes["float32"] <= sizes["onnx"], sizes
    REPORT[entry["file"]] = {"whole": worst, "stream": sworst, "sizes": sizes}


def test_print_corpus_report():
    """Prints the per-file errors and sizes (shown with pytest -s; used for the closing note)."""
    for f, r in sorted(REPORT.items()):
        s = r["sizes"]
        print(f"\n{f}: max err whole {r['whole']:.1e}, streamed "
              f"{'n/a' if r['stream'] is None else format(r['stream'], '.1e')}; bytes onnx {s['onnx']}, "
              f"f32 {s['float32']}, f16 {s['float16']}, int8 {s['int8']}", end="")
