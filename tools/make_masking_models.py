"""Exports the Keras masking test models (tests/data/masking/) through tf2onnx, from Keras 3
and from Keras 2 (the tf_keras package), and writes manifest.json describing each file. CI
needs neither framework: the small .onnx files are committed.

    python3 -m venv /tmp/tf && /tmp/tf/bin/pip install tensorflow tf_keras tf2onnx onnxruntime
    /tmp/tf/bin/python tools/make_masking_models.py --keras
    /tmp/tf/bin/python tools/make_masking_models.py --keras2

Patterns (I = 6 features or a vocabulary of 20, H = 8; random weights, fixed seeds):
  mask_*      x (B, T, I) and an explicit bool mask (B, T) given to the layer: layer(x, mask=m)
  masking_*   Masking(mask_value=0.) in front of the layer
  embed_*     Embedding(20, 6, mask_zero=True) in front of the layer (int32 tokens)
  embed_nomask_lstm, bidirectional_{lstm,gru}, masking_bidirectional_{lstm,gru},
  mask_last_{lstm,gru} (return_sequences=False, return_state=True: a classifier's layer),
  masking_stack_lstm_gru (Masking -> LSTM -> GRU: the mask flows on to the second layer)
for LSTM, GRU (reset_after True and False) and SimpleRNN, all return_sequences=True. Each
export is checked: onnx.checker, then onnxruntime against Keras itself (<= 1e-5) on inputs
whose masked steps are trailing and in the middle; an export that fails is reported and left
out. Each run replaces its own family's entries in the manifest and keeps the other's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "data", "masking")
MANIFEST = os.path.join(OUT, "manifest.json")
I, H, V = 6, 8, 20


def sample(kind, B=3, T=7, seed=1):
    """Inputs with masked steps trailing (row 0), in the middle (row 1) and first (row 2)."""
    rng = np.random.default_rng(seed)
    if kind == "tokens":
        x = rng.integers(1, V, (B, T)).astype(np.int32)
        masked = np.zeros((B, T), bool)
    else:
        x = rng.standard_normal((B, T, I)).astype(np.float32)
        masked = np.zeros((B, T), bool)
    masked[0, T - 2:] = True
    masked[1, 2:4] = True
    masked[2, 0] = True
    if B > 3:
        masked[3:] = rng.random((B - 3, T)) < 0.3
    if kind == "tokens":
        x[masked] = 0
    elif kind == "float":
        x[masked] = 0.0
    return x, ~masked


def export(legacy):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if legacy:
        os.environ["TF_USE_LEGACY_KERAS"] = "1"  # before TensorFlow is imported
        import tf_keras as keras
    else:
        import keras
    import onnx
    import onnxruntime as ort
    import tensorflow as tf
    import tf2onnx
    L = keras.layers
    keras.utils.set_random_seed(0)
    family = "keras2" if legacy else "keras3"

    def cells():
        return {"lstm": L.LSTM(H, return_sequences=True),
                "gru": L.GRU(H, return_sequences=True, reset_after=True),
                "gru_reset_before": L.GRU(H, return_sequences=True, reset_after=False),
                "simplernn": L.SimpleRNN(H, return_sequences=True)}

    models = []   # (name, model, input kinds)
    for name, cell in cells().items():
        x = keras.Input((None, I), name="x")
        m = keras.Input((None,), dtype="bool", name="mask")
        models.append((f"mask_{name}", keras.Model([x, m], cell(x, mask=m)), ["float", "mask"]))
    for name, cell in cells().items():
        x = keras.Input((None, I), name="x")
        models.append((f"masking_{name}", keras.Model(x, cell(L.Masking(0.0)(x))), ["float"]))
    for name, cell in cells().items():
        t = keras.Input((None,), dtype="int32", name="tokens")
        models.append((f"embed_{name}", keras.Model(t, cell(L.Embedding(V, I, mask_zero=True)(t))), ["tokens"]))
    t = keras.Input((None,), dtype="int32", name="tokens")
    models.append(("embed_nomask_lstm", keras.Model(t, L.LSTM(H, return_sequences=True)(L.Embedding(V, I)(t))),
                   ["tokens"]))
    for kind in ("LSTM", "GRU"):
        x = keras.Input((None, I), name="x")
        bi = L.Bidirectional(getattr(L, kind)(H, return_sequences=True))
        models.append((f"bidirectional_{kind.lower()}", keras.Model(x, bi(x)), ["float"]))
        x = keras.Input((None, I), name="x")
        bi = L.Bidirectional(getattr(L, kind)(H, return_sequences=True))
        models.append((f"masking_bidirectional_{kind.lower()}", keras.Model(x, bi(L.Masking(0.0)(x))), ["float"]))

    for kind in ("LSTM", "GRU"):   # a sequence classifier's layer: last output and final state
        x = keras.Input((None, I), name="x")
        m = keras.Input((None,), dtype="bool", name="mask")
        outs = getattr(L, kind)(H, return_sequences=False, return_state=True)(x, mask=m)
        models.append((f"mask_last_{kind.lower()}", keras.Model([x, m], outs), ["float", "mask"]))

    x = keras.Input((None, I), name="x")   # a stack: the mask flows on to the second layer
    y = L.GRU(H, return_sequences=True)(L.LSTM(H, return_sequences=True)(L.Masking(0.0)(x)))
    models.append(("masking_stack_lstm_gru", keras.Model(x, y), ["float"]))

    entries, failures = [], []
    for name, model, kinds in models:
        fname = f"{family}_{name}.onnx"
        path = os.path.join(OUT, fname)
        dt = {"float": tf.float32, "mask": tf.bool, "tokens": tf.int32}
        specs = [tf.TensorSpec((None,) + tuple(t.shape[1:]), dt[k], name=t.name.split(":")[0])
                 for t, k in zip(model.inputs, kinds)]
        x, keep = sample(kinds[0])
        args = [x] + ([keep] if "mask" in kinds else [])
        try:
            tf2onnx.convert.from_keras(model, input_signature=specs, opset=17, output_path=path)
            want = model(args if len(args) > 1 else args[0])
            want = [np.asarray(w) for w in (want if isinstance(want, (list, tuple)) else [want])]
            onnx.checker.check_model(onnx.load(path), full_check=True)
            sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            got = sess.run(None, {i.name: a for i, a in zip(sess.get_inputs(), args)})
            err = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
            if not err <= 1e-5:
                raise AssertionError(f"onnxruntime differs from Keras by {err:.2e}")
        except Exception as e:
            failures.append((fname, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
            if os.path.exists(path):
                os.remove(path)
            continue
        m = onnx.load(path)
        entries.append({"file": fname, "family": family, "inputs": [[i.name, k] for i, k in zip(m.graph.input, kinds)],
                        "ops": sorted({n.op_type for n in m.graph.node})})
        print("ok  ", fname, os.path.getsize(path), "bytes")
    versions = {"tensorflow": tf.__version__, family: keras.__version__, "tf2onnx": tf2onnx.__version__}
    return entries, failures, versions, family


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keras", action="store_true", help="export the Keras 3 models")
    ap.add_argument("--keras2", action="store_true", help="export the Keras 2 (tf_keras) models")
    args = ap.parse_args()
    if args.keras == args.keras2:
        ap.error("say --keras or --keras2 (each in a process of its own: tf_keras switches TensorFlow)")
    os.makedirs(OUT, exist_ok=True)
    entries, failures, versions, family = export(legacy=args.keras2)
    manifest = {"models": [], "versions": {}}
    if os.path.exists(MANIFEST):
        with open(MANIFEST) as f:
            manifest = json.load(f)
    manifest["models"] = [e for e in manifest["models"] if e["family"] != family] + entries
    manifest["versions"][family] = versions
    manifest["failures_" + family] = failures
    with open(MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    for fname, why in failures:
        print("FAIL", fname, why, file=sys.stderr)


if __name__ == "__main__":
    main()
