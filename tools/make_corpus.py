"""Exports the test corpus of recurrent models (tests/data/corpus/) from PyTorch, with both of
its ONNX exporters, and from Keras 3 through tf2onnx, and writes manifest.json describing each
file. CI needs neither framework: the small .onnx files are committed.

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.13.0 onnx onnxruntime onnxscript
    /tmp/tv/bin/python tools/make_corpus.py --torch

    python3 -m venv /tmp/tf && /tmp/tf/bin/pip install tensorflow tf_keras tf2onnx onnxruntime
    /tmp/tf/bin/python tools/make_corpus.py --keras
    /tmp/tf/bin/python tools/make_corpus.py --keras2

Each run replaces its own entries in the manifest and keeps the other family's. Weights are
random (fixed seeds) and non-symmetric; sizes are small so the corpus stays under a megabyte.
Every export is checked: onnx.checker, then onnxruntime against the framework's own output
(<= 1e-5); an export that fails either is reported and left out. Keras 2 is the tf_keras
package (TensorFlow 2.16+ ships Keras 3).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "data", "corpus")
MANIFEST = os.path.join(OUT, "manifest.json")
I, H = 6, 8  # input and hidden sizes of the sequence models


def check_with_ort(path, feeds, want):
    import onnx
    import onnxruntime as ort
    onnx.checker.check_model(onnx.load(path), full_check=True)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)
    for g, w in zip(got, want):
        err = float(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)).max()) if np.size(w) else 0.0
        if not err <= 1e-5:
            raise AssertionError(f"onnxruntime differs from the framework by {err:.2e}")


# --- PyTorch -----------------------------------------------------------------------------

def torch_models():
    """(name, module, example args, input specs, output names, dynamic axes, notes)."""
    import torch
    import torch.nn as nn

    class Seq(nn.Module):
        def __init__(self, kind, layers, bidir, batch_first, **kw):
            super().__init__()
            self.kind = kind
            self.m = getattr(nn, kind)(I, H, num_layers=layers, bidirectional=bidir, batch_first=batch_first, **kw)

        def forward(self, x):
            return self.m(x)

    class SeqInit(Seq):
        def forward(self, x, h0, c0=None):
            return self.m(x, (h0, c0)) if self.kind == "LSTM" else self.m(x, h0)

    class Tokens(nn.Module):
        def __init__(self, kind, head):
            super().__init__()
            self.e = nn.Embedding(20, 5)
            self.r = getattr(nn, kind)(5, H, num_layers=2, batch_first=True)
            self.o = nn.Linear(H, 20)
            self.head = head

        def forward(self, ids):
            y, _ = self.r(self.e(ids))
            return self.head(self.o(y), dim=-1)

    class Packed(nn.Module):
        def __init__(self, kind, enforce_sorted):
            super().__init__()
            self.r = getattr(nn, kind)(I, H, batch_first=True)
            self.enforce_sorted = enforce_sorted

        def forward(self, x, lens):
            p = nn.utils.rnn.pack_padded_sequence(x, lens, batch_first=True, enforce_sorted=self.enforce_sorted)
            y, h = self.r(p)
            y, _ = nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])
            return y, (h[0] if isinstance(h, tuple) else h)

    class CellLoop(nn.Module):
        def __init__(self, kind, T):
            super().__init__()
            self.kind, self.T = kind, T
            self.c = getattr(nn, kind + "Cell")(I, H)

        def forward(self, x):
            h = torch.zeros(x.shape[0], H)
            c = torch.zeros(x.shape[0], H)
            ys = []
            for t in range(self.T):
                if self.kind == "LSTM":
                    h, c = self.c(x[:, t], (h, c))
                else:
                    h = self.c(x[:, t], h)
                ys.append(h)
            return torch.stack(ys, 1)

    class Audio(nn.Module):
        """A Silero-VAD-like streaming model: a chunk of samples and the LSTM state in,
        a speech probability and the next state out."""

        def __init__(self):
            super().__init__()
            self.stft = nn.Conv1d(1, 18, 16, stride=8, bias=False)
            self.enc = nn.Conv1d(9, 12, 3, padding=1)
            self.lstm = nn.LSTM(12, 16)
            self.dec = nn.Conv1d(16, 1, 1)

        def forward(self, x, state):
            x = nn.functional.pad(x.unsqueeze(1), (8, 8), mode="reflect")
            z = self.stft(x)
            mag = torch.sqrt(z[:, :9].pow(2) + z[:, 9:].pow(2))
            f = torch.relu(self.enc(mag)).permute(2, 0, 1)
            y, (h, c) = self.lstm(f, (state[0], state[1]))
            p = torch.sigmoid(self.dec(torch.relu(y.permute(1, 2, 0)))).mean(2)
            return p, torch.stack([h, c])

    x_bf = torch.randn(3, 7, I)
    x_tf = torch.randn(7, 3, I)
    bt = {0: "batch", 1: "time"}
    tb = {0: "time", 1: "batch"}
    models = []
    for kind in ("LSTM", "GRU", "RNN"):
        for layers, bidir, bf in ((1, False, False), (2, False, True), (2, True, True), (1, True, False)):
            kw = {"nonlinearity": "relu"} if kind == "RNN" and layers == 2 else {}
            outs = ["y", "h_n"] + (["c_n"] if kind == "LSTM" else [])
            name = f"{kind.lower()}_{layers}layer{'_bidir' if bidir else ''}{'_batchfirst' if bf else ''}" + \
                ("_relu" if kw else "")
            models.append((name, Seq(kind, layers, bidir, bf, **kw), (x_bf if bf else x_tf,),
                           [("x", "float", bt if bf else tb)], outs, f"nn.{kind}, zero initial state built in the graph"))
        n0 = ["h0"] + (["c0"] if kind == "LSTM" else [])
        args = (x_bf,) + tuple(torch.randn(2, 3, H) for _ in n0)
        models.append((f"{kind.lower()}_2layer_batchfirst_initstate", SeqInit(kind, 2, False, True), args,
                       [("x", "float", bt)] + [(n, "state", {1: "batch"}) for n in n0],
                       ["y", "h_n"] + (["c_n"] if kind == "LSTM" else []),
                       f"nn.{kind} with initial states as graph inputs"))
    ids = torch.randint(0, 20, (3, 7))
    models.append(("token_lstm_logsoftmax", Tokens("LSTM", torch.log_softmax), (ids,), [("ids", "tokens", bt)],
                   ["logp"], "Embedding -> 2-layer LSTM -> Linear -> LogSoftmax"))
    models.append(("token_gru_softmax", Tokens("GRU", torch.softmax), (ids,), [("ids", "tokens", bt)],
                   ["p"], "Embedding -> 2-layer GRU -> Linear -> Softmax"))
    for kind in ("LSTM", "GRU"):
        for srt, lens in ((True, [7, 4, 2]), (False, [2, 7, 4])):
            models.append((f"packed_{kind.lower()}_{'sorted' if srt else 'unsorted'}", Packed(kind, srt),
                           (x_bf, torch.tensor(lens)), [("x", "float", bt), ("lens", "lengths", {0: "batch"})],
                           ["y", "h_n"], f"pack_padded_sequence(enforce_sorted={srt}) -> {kind} -> pad_packed_sequence"))
        models.append((f"{kind.lower()}cell_loop", CellLoop(kind, 5), (x_bf,), [("x", "float", {0: "batch"})], ["y"],
                       f"a Python loop over nn.{kind}Cell, unrolled by the exporter (T fixed at 5)"))
    models.append(("audio_vad_stateful", Audio(), (torch.randn(2, 128), torch.zeros(2, 1, 2, 16)),
                   [("x", "float", {0: "batch"}), ("state", "state", {2: "batch"})], ["prob", "stateN"],
                   "reflect Pad -> Conv1d (STFT-like) -> Pow/Sqrt -> Conv1d+ReLU -> LSTM with explicit state -> "
                   "Conv1d -> Sigmoid -> ReduceMean; one chunk of 128 samples per call"))
    return models


def export_torch(entries):
    import onnx
    import torch
    torch.manual_seed(0)
    failures = []
    # the dynamo exporter first: after legacy exports in the same process it fails on RNNs
    for dynamo, opset in ((True, 18), (False, 9), (False, 14), (False, 17)):
        for name, module, args, ins, outs, notes in torch_models():
            if not dynamo and opset == 9 and not name.startswith(("lstm_1layer", "gru_2layer", "token_lstm")):
                continue  # a few models at the oldest opset the exporter supports for them
            if not dynamo and opset == 17 and not name.startswith(("lstm_2layer_bidir", "audio", "packed_lstm",
                                                                 "token_gru")):
                continue
            tag = "dynamo" if dynamo else "legacy"
            fname = f"torch_{tag}_{name}_op{opset}.onnx"
            path = os.path.join(OUT, fname)
            module.eval()
            names = [n for n, _, _ in ins]
            dyn = {n: d for n, _, d in ins}
            with torch.no_grad():
                want = module(*args)
            want = [w for w in (want if isinstance(want, tuple) else (want,))]
            flat = []
            for w in want:
                flat.extend(w if isinstance(w, tuple) else [w])
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if dynamo:
                        # dynamic axes where torch.export allows them; where it specializes a
                        # size (unrolled loops), AUTO lets it and the axis becomes static
                        for hint in (torch.export.Dim.DYNAMIC, torch.export.Dim.AUTO):
                            shapes = tuple({k: hint for k in dyn[n]} for n in names)
                            try:
                                prog = torch.onnx.export(module, args, None, input_names=names, output_names=outs,
                                                         dynamo=True, dynamic_shapes=shapes, opset_version=opset)
                                break
                            except Exception:
                                if hint is torch.export.Dim.AUTO:
                                    raise
                        prog.save(path, external_data=False)
                    else:
                        torch.onnx.export(module, args, path, input_names=names, output_names=outs, dynamo=False,
                                          dynamic_axes=dyn, opset_version=opset)
                feeds = {n: a.numpy() for n, a in zip(names, args)}
                model = onnx.load(path)
                graph_inputs = {i.name for i in model.graph.input}
                check_with_ort(path, {k: v for k, v in feeds.items() if k in graph_inputs},
                               [w.numpy() for w in flat][:len(model.graph.output)])
            except Exception as e:  # an exporter limitation: recorded, not shipped
                failures.append((fname, _why(e)))
                if os.path.exists(path):
                    os.remove(path)
                continue
            entry = manifest_entry(fname, f"torch-{tag}", opset, notes, model, ins, args)
            mark_fixed_time(entry, ins, path, [a.numpy() for a in args])
            entries.append(entry)
            print("ok  ", fname, os.path.getsize(path), "bytes")
    return failures


def _why(e):
    """The line of an exporter's long error message that says what went wrong."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if any(k in ln for k in ("Error:", "error:", "Constraints violated", "guard", "Unsupported")):
            return f"{type(e).__name__}: {ln[:200]}"
    return f"{type(e).__name__}: {(lines or [''])[-1][:200]}"


def mark_fixed_time(entry, ins, path=None, args=None):
    """Records when the exporter fixed the time axis (unrolled the recurrence for the example
    length, or baked the length into a Reshape): such a file has no time axis to stream
    over, by construction. Checked by running onnxruntime one step longer."""
    if path is not None:
        import onnxruntime as ort
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        feeds, longer, grew = {}, {}, False
        for (name, kind, dyn), a in zip(ins, args):
            a = np.asarray(a)
            feeds[name] = a
            t_axes = [ax for ax, nm in (dyn or {}).items() if nm == "time"]
            longer[name] = np.concatenate([a, np.take(a, [-1], axis=t_axes[0])], axis=t_axes[0]) if t_axes else a
            grew |= bool(t_axes)
        if grew:
            try:
                base = sess.run(None, feeds)
                more = sess.run(None, longer)
                same = all(b.shape == m.shape for b, m in zip(base, more))
                reason = "onnxruntime's outputs keep the example length" if same else None
            except Exception:
                reason = "onnxruntime fails at any other length"
            if reason:
                entry["fixed_time"] = (f"the exporter baked the example length into the graph ({reason}): "
                                       "there is no time axis to stream over")
    for spec, (_, _, dyn) in zip(entry["inputs"], ins):
        for axis, name in (dyn or {}).items():
            if name == "time" and axis < len(spec["shape"]) and isinstance(spec["shape"][axis], int) \
                    and spec["shape"][axis] > 0:
                entry["fixed_time"] = ("the exporter unrolled the recurrence for the example length "
                                       f"{spec['shape'][axis]}: input {spec['name']!r} has a static time axis")
    if "Cell" in entry["description"]:
        entry["fixed_time"] = "a Python loop over a cell, unrolled by the exporter for T = 5: no time axis"


def manifest_entry(fname, source, opset, notes, model, ins, args):
    kinds = {n: k for n, k, _ in ins}
    entry = {"file": fname, "source": source, "opset": opset, "description": notes, "inputs": [],
             "outputs": [o.name for o in model.graph.output], "state_pairs": [], "notes": ""}
    for i, a in zip(model.graph.input, args):
        dims = [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        spec = {"name": i.name, "dtype": str(np.asarray(a).dtype), "shape": dims, "kind": kinds.get(i.name, "float"),
                "example_shape": list(np.asarray(a).shape)}
        if spec["kind"] == "tokens":
            spec["vocab"] = 20
        entry["inputs"].append(spec)
    return entry


# --- Keras 3 through tf2onnx ---------------------------------------------------------------

def export_keras(entries, legacy=False):
    """Keras 3 (legacy=False) or Keras 2 (the tf_keras package, legacy=True)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if legacy:
        os.environ["TF_USE_LEGACY_KERAS"] = "1"  # before TensorFlow is imported
        import tf_keras as keras
    else:
        import keras
    import onnx
    import tensorflow as tf
    import tf2onnx
    layers = keras.layers
    keras.utils.set_random_seed(0)
    family = "keras2" if legacy else "keras3"
    failures = []

    def seq(layer):
        inp = keras.Input((None, I), name="x")
        return keras.Model(inp, layer(inp))
    models = [
        ("lstm", seq(layers.LSTM(H, return_sequences=True)), "keras.layers.LSTM"),
        ("gru_reset_after", seq(layers.GRU(H, return_sequences=True, reset_after=True)), "GRU(reset_after=True)"),
        ("gru_reset_before", seq(layers.GRU(H, return_sequences=True, reset_after=False)), "GRU(reset_after=False)"),
        ("bidirectional_lstm", seq(layers.Bidirectional(layers.LSTM(H, return_sequences=True))), "Bidirectional(LSTM)"),
        ("simplernn", seq(layers.SimpleRNN(H, return_sequences=True)), "SimpleRNN"),
    ]
    inp = keras.Input((None, I), name="x")
    h0, c0 = keras.Input((H,), name="h0"), keras.Input((H,), name="c0")
    y, h, c = layers.LSTM(H, return_sequences=True, return_state=True)(inp, initial_state=[h0, c0])
    models.append(("lstm_state_io", keras.Model([inp, h0, c0], [y, h, c]),
                   "LSTM with initial_state inputs and return_state=True (state carried as graph I/O)"))
    for name, model, notes in models:
        fname = f"{family}_tf2onnx_{name}_op17.onnx"
        path = os.path.join(OUT, fname)
        specs = [tf.TensorSpec((None,) + tuple(t.shape[1:]), tf.float32, name=t.name.split(":")[0])
                 for t in model.inputs]
        args = [np.random.default_rng(1).standard_normal((3, 5, I) if s.shape.rank == 3 else (3, H)).astype(np.float32)
                for s in specs]
        try:
            tf2onnx.convert.from_keras(model, input_signature=specs, opset=17, output_path=path)
            want = model(args if len(args) > 1 else args[0])
            want = [np.asarray(w) for w in (want if isinstance(want, (list, tuple)) else [want])]
            m = onnx.load(path)
            check_with_ort(path, {i.name: a for i, a in zip(m.graph.input, args)}, want)
        except Exception as e:
            failures.append((fname, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
            if os.path.exists(path):
                os.remove(path)
            continue
        ins = [(i.name, "state" if i.name in ("h0", "c0") else "float", None) for i in m.graph.input]
        entries.append(manifest_entry(fname, f"{family}-tf2onnx", 17, notes, m, ins, args))
        print("ok  ", fname, os.path.getsize(path), "bytes")
    versions = {"tensorflow": tf.__version__, family: keras.__version__, "tf2onnx": tf2onnx.__version__}
    return failures, versions


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch", action="store_true", help="export the PyTorch models")
    ap.add_argument("--keras", action="store_true", help="export the Keras 3 models through tf2onnx")
    ap.add_argument("--keras2", action="store_true", help="export the Keras 2 (tf_keras) models through tf2onnx")
    args = ap.parse_args()
    if not (args.torch or args.keras or args.keras2):
        ap.error("say --torch, --keras and/or --keras2 (Keras 2 in a process of its own)")
    if args.keras2 and args.keras:
        ap.error("--keras2 needs a process of its own (it switches TensorFlow to tf_keras)")
    os.makedirs(OUT, exist_ok=True)
    manifest = json.load(open(MANIFEST)) if os.path.exists(MANIFEST) else {"generated_with": {}, "models": []}
    import onnx
    import onnxruntime
    manifest["generated_with"].update({"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__})
    failures = []
    for flag, prefix, fn in ((args.torch, "torch_", export_torch), (args.keras, "keras3", export_keras),
                             (args.keras2, "keras2", lambda e: export_keras(e, legacy=True))):
        if not flag:
            continue
        for e in [e for e in manifest["models"] if e["file"].startswith(prefix)]:
            p = os.path.join(OUT, e["file"])
            if os.path.exists(p):
                os.remove(p)
        manifest["models"] = [e for e in manifest["models"] if not e["file"].startswith(prefix)]
        entries = []
        res = fn(entries)
        if isinstance(res, tuple):
            res, versions = res
            manifest["generated_with"].update(versions)
        else:
            import torch
            manifest["generated_with"]["torch"] = torch.__version__
        failures += res
        manifest["models"] += entries
    manifest["models"].sort(key=lambda e: e["file"])
    manifest["export_failures"] = sorted(set(map(tuple, manifest.get("export_failures", []))) | set(failures))
    with open(MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
    total = sum(os.path.getsize(os.path.join(OUT, e["file"])) for e in manifest["models"])
    print(f"{len(manifest['models'])} models, {total:,} bytes; {len(failures)} exports failed:")
    for f, why in failures:
        print("  ", f, "--", why)
    return 0


if __name__ == "__main__":
    sys.exit(main())
