"""Exports the test corpus of recurrent models (tests/data/corpus/) from PyTorch, with both of
its ONNX exporters, and from Keras 2 and 3 through tf2onnx, and writes manifest.json
describing each file. CI needs neither framework: the small .onnx files are committed.

    python3 -m venv /work/venv-torch && /work/venv-torch/bin/pip install torch==2.13.0 onnx onnxruntime onnxscript
    /work/venv-torch/bin/python tools/make_corpus.py --torch

    python3 -m venv /work/venv-tf && /work/venv-tf/bin/pip install tensorflow tf_keras tf2onnx onnxruntime
    /work/venv-tf/bin/python tools/make_corpus.py --keras
    /work/venv-tf/bin/python tools/make_corpus.py --keras2

    python tools/make_corpus.py --triage     # in the project's own venv (rnnengine installed)

Each export run replaces its own family's files, entries and export failures in the manifest
and keeps the others'. Weights are random (fixed seeds) and non-symmetric; sizes are small
(I=6, H=8) so the corpus stays well under 3 MB. Every export is checked: onnx.checker, then
onnxruntime against the framework's own output (<= 1e-5); an export that fails either is
recorded in the manifest's "export_failures" with the reason and not shipped (the one
exception, nn.LSTM(proj_size) from the dynamo exporter, is shipped on purpose and its entry
says what onnxruntime does with it). Keras 2 is the tf_keras package (TensorFlow 2.16+ ships
Keras 3).

Besides the plain layers, the corpus holds the patterns users bring (each entry's "pattern"):
Conv1d front ends (centred, causal, dilated, strided; a keyword-spotting Conv-GRU-Softmax),
mean pooling over time, Keras masking (Embedding(mask_zero=True), Masking; example inputs
with masked steps in the middle and at the end are shipped as <file>.feeds.npz and named by
"example_feeds"), Keras Bidirectional(GRU), bidirectional recurrences with h0/c0 graph
inputs, packed sequences, opset >= 22 (the dynamo exporter at 22 and the newest it takes;
the legacy exporter stops earlier, so its opset-17 export converted by
onnx.version_converter, said in "opset_via"), and the dynamo export of nn.LSTM(proj_size).

Every entry says whether a stream of it should exist: "streaming": {"expect": "stream" |
"refuse", "why": ..., "delay": N}. Per-step ops, forward recurrences and causal convs/pads
stream; convs/pads with look-ahead stream with a delay of (right padding x the product of
the strides before them) input steps; reverse/bidirectional recurrences (also with h0
inputs), reductions over time (mean pooling), ReverseSequence, anything that moves time into
features, and exports whose time length is baked in ("fixed_time") refuse. An entry may also
carry "conversion": {"expect": "refuse", ...} when the file itself is wrong.

New pattern exports land in "pending"; --triage runs this checkout's engine over them (the
corpus test itself, plus the example inputs where shipped) and moves those that pass into
"models", which tests/test_corpus.py runs; the others stay in "pending" with the engine's
message in "engine_today". Each pattern entry also gets "engine_check": converts or not, the
whole-sequence and streamed max errors, and "silent_wrong_stream" where the engine streams
without an error but differs from the whole-sequence result.
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
ONLY: list[str] = []  # --only: export just the models whose name contains one of these


def selected(name):
    return not ONLY or any(o in name for o in ONLY)
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


def stream(why, delay=None):
    """A manifest entry's streaming expectation: the stream is made (with this delay)."""
    d = {"expect": "stream", "why": why}
    if delay:
        d["delay"] = delay
    return d


def refuse(why):
    """A manifest entry's streaming expectation: stream() refuses, for this reason."""
    return {"expect": "refuse", "why": why}


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

    torch.manual_seed(0)  # the same weights and examples on every exporter run
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
    models = [m + ({"exports": _legacy_schedule(m[0])},) for m in models]
    return models + torch_pattern_models(x_bf, bt, SeqInit, Packed)


def _legacy_schedule(name):
    """The exporter runs of the original models: dynamo at 18 and legacy at 14 for all, legacy
    at 9 and 17 for a few (the oldest opset the exporter takes for them, and 17)."""
    runs = [("dynamo", 18), ("legacy", 14)]
    if name.startswith(("lstm_1layer", "gru_2layer", "token_lstm")):
        runs.append(("legacy", 9))
    if name.startswith(("lstm_2layer_bidir", "audio", "packed_lstm", "token_gru")):
        runs.append(("legacy", 17))
    return runs


def conv_delay(convs):
    """Input steps of look-ahead of a stack of convs: each conv's right padding times the
    product of the strides before it."""
    delay, stride = 0, 1
    for c in convs:
        right = 0 if c["pad"] == "causal" else c.get("d", 1) * (c["k"] - 1) // 2
        delay += right * stride
        stride *= c.get("s", 1)
    return delay


def torch_pattern_models(x_bf, bt, SeqInit, Packed):
    """The patterns users bring (issue 9, point 7), each with its streaming expectation:
    (name, module, args, input specs, outputs, notes, meta)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class ConvFront(nn.Module):
        """Conv1d layers over time (batch-first input, time along the conv's length axis),
        each followed by ReLU, then a recurrent layer; optionally a per-frame softmax head."""

        def __init__(self, kind, convs, head=False):
            super().__init__()
            self.convs = convs
            chans = [I] + [8] * len(convs)
            self.c = nn.ModuleList(
                nn.Conv1d(a, b, c["k"], stride=c.get("s", 1), dilation=c.get("d", 1),
                          padding=0 if c["pad"] == "causal" else c.get("d", 1) * (c["k"] - 1) // 2)
                for a, b, c in zip(chans, chans[1:], convs))
            self.r = getattr(nn, kind)(8, H, batch_first=True)
            self.o = nn.Linear(H, 5) if head else None

        def forward(self, x):
            z = x.transpose(1, 2)                     # (B, I, T): time along the conv's length
            for spec, conv in zip(self.convs, self.c):
                if spec["pad"] == "causal":
                    z = F.pad(z, ((spec["k"] - 1) * spec.get("d", 1), 0))
                z = torch.relu(conv(z))
            y, h = self.r(z.transpose(1, 2))
            if self.o is not None:
                return torch.softmax(self.o(y), dim=-1)
            return y, (h[0] if isinstance(h, tuple) else h)

    class SelfAttention(nn.Module):
        """A recurrent layer, scaled dot-product self-attention over its outputs (both operands
        of the MatMuls computed at run time), a Linear head."""

        def __init__(self, kind):
            super().__init__()
            self.r = getattr(nn, kind)(I, H, batch_first=True)
            self.o = nn.Linear(H, 5)

        def forward(self, x):
            y, _ = self.r(x)
            a = torch.softmax(y @ y.transpose(1, 2) / H ** 0.5, dim=-1)
            return self.o(a @ y)

    class MHA(nn.Module):
        """A recurrent layer, nn.MultiheadAttention(H, 2 heads) over its outputs, the mean over
        time, a Linear head (a sequence classifier)."""

        def __init__(self):
            super().__init__()
            self.r = nn.LSTM(I, H, batch_first=True)
            self.a = nn.MultiheadAttention(H, 2, batch_first=True)
            self.o = nn.Linear(H, 5)

        def forward(self, x):
            y, _ = self.r(x)
            z, _ = self.a(y, y, y, need_weights=False)
            return self.o(z.mean(dim=1))

    class ConvPool(nn.Module):
        """Conv1d(k=3, padding=1) -> ReLU -> a pool along time -> a recurrent layer -> Linear
        (a CRNN front end: keyword spotting, sound events)."""

        def __init__(self, kind, pool):
            super().__init__()
            self.c = nn.Conv1d(I, 8, 3, padding=1)
            self.p = pool
            self.r = getattr(nn, kind)(8, H, batch_first=True)
            self.o = nn.Linear(H, 5)

        def forward(self, x):
            z = self.p(torch.relu(self.c(x.transpose(1, 2))))
            y, _ = self.r(z.transpose(1, 2))
            return self.o(y)

    class MeanPool(nn.Module):
        def __init__(self):
            super().__init__()
            self.r = nn.GRU(I, H, batch_first=True)
            self.o = nn.Linear(H, 4)

        def forward(self, x):
            y, _ = self.r(x)
            return self.o(y.mean(dim=1))

    class Plain(nn.Module):
        def __init__(self, **kw):
            super().__init__()
            self.m = nn.LSTM(I, H, **kw)

        def forward(self, x):
            return self.m(x)

    class Normed(nn.Module):
        """nn.LayerNorm over the input features, a recurrent layer, nn.LayerNorm over its
        outputs, a Linear head (pre- and post-norm, as in speech and token models). Both
        exporters write LayerNormalization from opset 17; the legacy exporter below 17
        spells it out (ReduceMean, Sub, Pow, Sqrt, Div, Mul, Add)."""

        def __init__(self, kind):
            super().__init__()
            self.n0 = nn.LayerNorm(I)
            self.r = getattr(nn, kind)(I, H, batch_first=True)
            self.n1 = nn.LayerNorm(H, eps=1e-3)
            self.o = nn.Linear(H, 5)
            with torch.no_grad():  # non-trivial affine parameters (nn.LayerNorm starts at 1 and 0)
                for n in (self.n0, self.n1):
                    n.weight.uniform_(0.5, 1.5)
                    n.bias.uniform_(-0.5, 0.5)

        def forward(self, x):
            y, _ = self.r(self.n0(x))
            return self.o(self.n1(y))

    base = [("dynamo", 18), ("legacy", 14), ("legacy", 17)]
    xo = [("x", "float", bt)]
    models = []
    convs = {
        "conv_centred": [{"k": 3, "pad": "centred"}],
        "conv_causal": [{"k": 3, "pad": "causal"}],
        "conv_dilated_causal": [{"k": 3, "d": 2, "pad": "causal"}],
        "conv_dilated_centred": [{"k": 3, "d": 2, "pad": "centred"}],
        "conv_strided": [{"k": 3, "s": 2, "pad": "centred"}],
        "conv_strided_then_centred": [{"k": 3, "s": 2, "pad": "centred"}, {"k": 3, "pad": "centred"}],
    }
    for pattern, cs in convs.items():
        for kind in ("GRU", "LSTM"):
            if kind == "LSTM" and pattern not in ("conv_centred", "conv_causal"):
                continue
            d = conv_delay(cs)
            desc = " -> ".join(
                ("F.pad(left %d) -> " % ((c["k"] - 1) * c.get("d", 1)) if c["pad"] == "causal" else "") +
                f"Conv1d(k={c['k']}, dilation={c.get('d', 1)}, stride={c.get('s', 1)}, "
                f"padding={0 if c['pad'] == 'causal' else c.get('d', 1) * (c['k'] - 1) // 2}) -> ReLU" for c in cs)
            why = ("causal convs (left padding only) and a forward recurrence" if not d else
                   f"convs with look-ahead: right padding x strides before them = {d} input step(s) of delay; "
                   "forward recurrence")
            models.append((f"{pattern}_{kind.lower()}", ConvFront(kind, cs), (x_bf,), xo, ["y", "h_n"],
                           f"{desc} -> nn.{kind}, batch first", {"pattern": pattern, "streaming": stream(why, d),
                                                                  "exports": base}))
    models.append(("kws_conv_gru_softmax", ConvFront("GRU", [{"k": 3, "pad": "centred"}], head=True), (x_bf,), xo,
                   ["p"], "keyword spotting: Conv1d(k=3, padding=1) -> ReLU -> GRU -> Linear -> Softmax per frame",
                   {"pattern": "kws_conv_gru", "exports": base,
                    "streaming": stream("a centred k=3 conv (1 step of look-ahead), a forward GRU and per-frame "
                                        "ops", 1)}))
    for kind in ("LSTM", "GRU"):
        models.append((f"{kind.lower()}_selfattention_linear", SelfAttention(kind), (x_bf,), xo, ["logits"],
                       f"nn.{kind} -> softmax(Y Y^T / sqrt(H)) Y (self-attention) -> nn.Linear",
                       {"pattern": "self_attention", "exports": base,
                        "streaming": refuse("attention weighs every step by every other: the whole sequence")}))
    models.append(("lstm_multiheadattention_mean_linear", MHA(), (x_bf,), xo, ["logits"],
                   "nn.LSTM -> nn.MultiheadAttention(H, 2 heads) -> mean over time -> nn.Linear",
                   {"pattern": "self_attention", "exports": base,
                    "streaming": refuse("attention and the mean over time need the whole sequence")}))
    for name, pool, kind, desc in (
            ("conv_maxpool_gru_linear", nn.MaxPool1d(2), "GRU", "MaxPool1d(2)"),
            ("conv_avgpool_lstm_linear", nn.AvgPool1d(3, stride=2, padding=1, count_include_pad=False), "LSTM",
             "AvgPool1d(3, stride=2, padding=1, count_include_pad=False)")):
        models.append((name, ConvPool(kind, pool), (x_bf,), xo, ["logits"],
                       f"Conv1d(k=3, padding=1) -> ReLU -> {desc} -> nn.{kind} -> nn.Linear",
                       {"pattern": "conv_pool", "exports": base,
                        "streaming": stream("a centred conv (1 step of look-ahead), then a pool whose window "
                                            "reaches 1 step further, then a forward recurrence", 2)}))
    models.append(("meanpool_gru_linear", MeanPool(), (x_bf,), xo, ["logits"], "GRU -> mean over time -> Linear",
                   {"pattern": "mean_pool", "exports": base,
                    "streaming": refuse("ReduceMean over the time axis needs the whole sequence")}))
    for kind in ("LSTM", "GRU"):
        n0 = ["h0"] + (["c0"] if kind == "LSTM" else [])
        args = (x_bf,) + tuple(torch.randn(2, 3, H) for _ in n0)
        models.append((f"{kind.lower()}_1layer_bidir_batchfirst_initstate", SeqInit(kind, 1, True, True), args,
                       xo + [(n, "state", {1: "batch"}) for n in n0], ["y", "h_n"] + (["c_n"] if kind == "LSTM" else []),
                       f"bidirectional nn.{kind} with h0{'/c0' if kind == 'LSTM' else ''} graph inputs and "
                       f"h_n{'/c_n' if kind == 'LSTM' else ''} graph outputs",
                       {"pattern": "bidir_initstate", "exports": base,
                        "streaming": refuse("the reverse direction needs the whole sequence, even with the "
                                            "initial state as graph inputs")}))
    for srt, lens in ((True, [7, 4, 2]), (False, [2, 7, 4])):
        for kind in ("RNN",):  # packed LSTM/GRU are among the original models (both exporters)
            runs = [("dynamo", 18), ("legacy", 14)]
            models.append((f"packed_{kind.lower()}_{'sorted' if srt else 'unsorted'}", Packed(kind, srt),
                           (x_bf, torch.tensor(lens)), [("x", "float", bt), ("lens", "lengths", {0: "batch"})],
                           ["y", "h_n"], f"pack_padded_sequence(enforce_sorted={srt}) -> {kind} -> pad_packed_sequence",
                           {"pattern": "packed", "exports": runs,
                            "streaming": stream("a forward recurrence with sequence lengths (each chunk's lengths "
                                                "clipped to the chunk)")}))
    # opset >= 22: the dynamo exporter at 22 and at 25, the newest it writes itself (above 25
    # it hands the model to onnx's C version converter; asked for 30 it silently writes 18);
    # the legacy exporter at 22 and 23 (it warns that it supports 20, writes up to 23 and
    # refuses 24); and its opset-17 export converted by onnx.version_converter to the newest
    # opset the onnx package defines
    new = [("dynamo", 22), ("dynamo", 25), ("legacy", 22), ("legacy", 23), ("legacy-vc", NEWEST_ONNX)]
    xt = torch.randn(7, 3, I)
    models.append(("lstm_1layer_newopset", Plain(), (xt,), [("x", "float", {0: "time", 1: "batch"})],
                   ["y", "h_n", "c_n"], "nn.LSTM, zero initial state built in the graph, at opset >= 22",
                   {"pattern": "opset_ge22", "exports": new, "streaming": stream("a forward LSTM")}))
    models.append(("gru_2layer_batchfirst_newopset", SeqInit("GRU", 2, False, True),
                   (x_bf, torch.randn(2, 3, H)), [("x", "float", bt), ("h0", "state", {1: "batch"})],
                   ["y", "h_n"], "2-layer nn.GRU with h0 as a graph input, at opset >= 22",
                   {"pattern": "opset_ge22", "exports": new, "streaming": stream("a forward 2-layer GRU")}))
    models.append(("kws_conv_gru_softmax_newopset", ConvFront("GRU", [{"k": 3, "pad": "centred"}], head=True),
                   (x_bf,), xo, ["p"], "Conv1d(k=3, padding=1) -> ReLU -> GRU -> Linear -> Softmax, at opset >= 22",
                   {"pattern": "opset_ge22", "exports": new,
                    "streaming": stream("a centred k=3 conv (1 step of look-ahead) and a forward GRU", 1)}))
    models.append(("lstm_proj", Plain(proj_size=4), (xt,), [("x", "float", {0: "time", 1: "batch"})],
                   ["y", "h_n", "c_n"], "nn.LSTM(proj_size=4)",
                   {"pattern": "lstm_proj_size", "exports": [("dynamo", 18), ("legacy", 14)], "ort_may_differ": True,
                    "streaming": stream("a forward LSTM (if it were converted)"),
                    "conversion": {"expect": "refuse",
                                   "why": "the dynamo exporter writes a plain LSTM node with hidden_size = "
                                          "proj_size (4): W and R cut to 4 x 4 gate rows, the projection weight "
                                          "weight_hr dropped, and an initial_c of the real hidden size (8); the "
                                          "file does not compute nn.LSTM(proj_size): the engine must refuse it, "
                                          "naming the LSTM node"}}))
    for kind in ("LSTM", "GRU"):
        models.append((f"layernorm_{kind.lower()}_layernorm_linear", Normed(kind), (x_bf,), xo, ["logits"],
                       f"nn.LayerNorm -> nn.{kind} (batch first) -> nn.LayerNorm -> nn.Linear",
                       {"pattern": "layernorm", "exports": base + [("dynamo", 22), ("legacy", 23)],
                        "streaming": stream("layer norms over the features of each step and a forward "
                                            "recurrence")}))
    return models


NEWEST_ONNX = 28  # replaced at run time by the newest opset the onnx package defines


def export_torch(entries):
    global NEWEST_ONNX
    import onnx
    import torch
    NEWEST_ONNX = onnx.defs.onnx_opset_version()
    failures = []
    # every (exporter, opset) run of any model; the dynamo exporter first: after legacy
    # exports in the same process it fails on RNNs
    runs = list(dict.fromkeys(r for m in torch_models() if selected(m[0]) for r in m[6]["exports"]))
    runs.sort(key=lambda r: (r[0] != "dynamo", r[0], r[1]))
    for exporter, opset in runs:
        for name, module, args, ins, outs, notes, meta in torch_models():
            if (exporter, opset) not in meta["exports"] or not selected(name):
                continue
            tag = {"dynamo": "dynamo", "legacy": "legacy", "legacy-vc": "legacy_vc"}[exporter]
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
            ort_note = None
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if exporter == "dynamo":
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
                    elif exporter == "legacy":
                        torch.onnx.export(module, args, path, input_names=names, output_names=outs, dynamo=False,
                                          dynamic_axes=dyn, opset_version=opset)
                    else:  # the legacy exporter at 17, then onnx's version converter up to `opset`
                        torch.onnx.export(module, args, path, input_names=names, output_names=outs, dynamo=False,
                                          dynamic_axes=dyn, opset_version=17)
                        import onnx.version_converter
                        onnx.save(onnx.version_converter.convert_version(onnx.load(path), opset), path)
                feeds = {n: a.numpy() for n, a in zip(names, args)}
                model = onnx.load(path)
                graph_inputs = {i.name for i in model.graph.input}
                ort_feeds = {k: v for k, v in feeds.items() if k in graph_inputs}
                want_np = [w.numpy() for w in flat][:len(model.graph.output)]
                if meta.get("ort_may_differ"):  # an invalid export shipped on purpose: say what happens
                    ort_note = describe_invalid(path, ort_feeds, want_np)
                else:
                    check_with_ort(path, ort_feeds, want_np)
            except Exception as e:  # an exporter limitation: recorded, not shipped
                failures.append((fname, _why(e)))
                if os.path.exists(path):
                    os.remove(path)
                continue
            source = {"dynamo": "torch-dynamo", "legacy": "torch-legacy",
                      "legacy-vc": "torch-legacy+onnx.version_converter"}[exporter]
            entry = manifest_entry(fname, source, opset, notes, model, ins, args)
            if exporter == "legacy-vc":
                entry["opset_via"] = (f"exported by torch.onnx.export(dynamo=False) at opset 17, then converted by "
                                      f"onnx.version_converter.convert_version to {opset}, the newest opset onnx "
                                      f"{onnx.__version__} defines (the legacy exporter refuses opsets above 23)")
            mark_fixed_time(entry, ins, path, [a.numpy() for a in args])
            finish_entry(entry, meta, name)
            if meta.get("ort_may_differ"):
                entry["notes"] = ort_note
            entries.append(entry)
            print("ok  ", fname, os.path.getsize(path), "bytes")
    return failures


def describe_invalid(path, feeds, want):
    """What onnx.checker and onnxruntime make of a file shipped although it is known to be
    wrong: each step's outcome, in one sentence."""
    import onnx
    import onnxruntime as ort
    parts = []
    try:
        onnx.checker.check_model(onnx.load(path), full_check=True)
        parts.append("onnx.checker (full_check) accepts it")
    except Exception as e:
        parts.append("onnx.checker (full_check) rejects it: " + " ".join(str(e).split())[:200])
    try:
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as e:
        return "; ".join(parts + ["onnxruntime refuses to load it: " + " ".join(str(e).split())[:200]])
    try:
        got = sess.run(None, feeds)
    except Exception as e:
        return "; ".join(parts + ["onnxruntime loads it and fails at run: " + " ".join(str(e).split())[:200]])
    err = max(float(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)).max())
              if np.shape(g) == np.shape(w) else np.inf for g, w in zip(got, want))
    return "; ".join(parts + [f"onnxruntime runs it; max difference from PyTorch {err:.2g}"])


def finish_entry(entry, meta, name):
    """Adds the pattern, the streaming expectation (by the rule in the module docstring) and
    any conversion expectation to a manifest entry."""
    if "pattern" in meta:
        entry["pattern"] = meta["pattern"]
    streaming = dict(meta.get("streaming") or streaming_by_rule(name))
    if entry.get("fixed_time"):
        streaming = {"expect": "refuse", "why": entry["fixed_time"]}
    entry["streaming"] = streaming
    if "conversion" in meta:
        entry["conversion"] = meta["conversion"]
    if "example_feeds" in meta:
        entry["example_feeds"] = meta["example_feeds"]


def streaming_by_rule(name):
    """The streaming expectation of the original corpus models, from their names."""
    if "bidir" in name:
        return {"expect": "refuse", "why": "a reverse direction needs the whole sequence"}
    if name.startswith("audio"):
        return {"expect": "stream", "why": "one chunk per call with the LSTM state as graph I/O: the reflect pad, "
                                           "the strided convs and the mean act inside one chunk"}
    if "state_io" in name or "initstate" in name:
        return {"expect": "stream", "why": "a forward recurrence whose state is graph I/O (paired and carried)"}
    return {"expect": "stream", "why": "per-step ops and forward recurrences only"}


def _why(e):
    """The line of an exporter's long error message that says what went wrong."""
    while e.__cause__ is not None:
        e = e.__cause__
    import re
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
    lines = [ln for ln in lines if ln and "Refer to the full stack trace" not in ln and "This is step" not in ln]
    for ln in lines:
        if any(k in ln for k in ("Error:", "error:", "Constraints violated", "guard", "Unsupported")):
            return f"{type(e).__name__}: {ln[:200]}"
    return f"{type(e).__name__}: {(lines or [''])[-1][:200]}"


def mark_fixed_time(entry, ins, path=None, args=None):
    """Records when the exporter fixed the time axis (unrolled the recurrence for the example
    length, or baked the length into a Reshape): such a file has no time axis to stream
    over, by construction. Checked by running onnxruntime four steps longer: the outputs
    fail, or come out the same (shapes and values) as if the steps were not there."""
    if path is not None:
        import onnxruntime as ort
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        feeds, longer, grew = {}, {}, False
        rng = np.random.default_rng(5)
        for (name, kind, dyn), a in zip(ins, args):
            a = np.asarray(a)
            feeds[name] = a
            t_axes = [ax for ax, nm in (dyn or {}).items() if nm == "time"]
            if t_axes:  # 4 more steps (a stride-2 conv's output grows too), new values where floats
                extra = np.repeat(np.take(a, [-1], axis=t_axes[0]), 4, axis=t_axes[0])
                if a.dtype.kind == "f":
                    extra = rng.standard_normal(extra.shape).astype(a.dtype)
                longer[name] = np.concatenate([a, extra], axis=t_axes[0])
            else:
                longer[name] = a
            grew |= bool(t_axes)
        reason = None
        if grew:
            try:
                base = sess.run(None, feeds)
            except Exception:
                base = None  # onnxruntime cannot run the file at all: nothing to say about time
            if base is not None:
                try:
                    more = sess.run(None, longer)
                    # baked: the outputs keep their shapes and either ignore the extra steps or
                    # keep a time axis of the example length (an unrolled reverse direction
                    # reads the last steps); a mean over time keeps its shape, not its values
                    T = next(np.asarray(x).shape[ax] for (_, _, d), x in zip(ins, args)
                             for ax, nm in (d or {}).items() if nm == "time")
                    if all(b.shape == m.shape for b, m in zip(base, more)):
                        if all(np.array_equal(b, m) for b, m in zip(base, more)):
                            reason = "onnxruntime ignores steps past the example length"
                        elif any(T in b.shape for b in base):
                            reason = "onnxruntime's outputs keep the example length"
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

def masked_examples():
    """Example inputs with masked steps (zeros) in the middle and at the end of sequences:
    token ids (3, 7) for Embedding(mask_zero=True) and floats (3, 7, I) for Masking(0.)."""
    ids = np.array([[3, 5, 0, 7, 2, 0, 0],      # one masked step in the middle, two at the end
                    [1, 2, 3, 4, 5, 6, 7],      # nothing masked
                    [4, 0, 0, 9, 1, 11, 0]],    # two in the middle, one at the end
                   np.int32)
    x = np.random.default_rng(2).standard_normal((3, 7, I)).astype(np.float32)
    x[ids == 0] = 0.0
    return ids, x


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

    def seq(*stack, tokens=False):
        inp = keras.Input((None,), dtype="int32", name="ids") if tokens else keras.Input((None, I), name="x")
        y = inp
        for layer in stack:
            y = layer(y)
        return keras.Model(inp, y)
    fwd = stream("per-step ops and forward recurrences only")
    bidir = refuse("the backward layer needs the whole sequence")
    models = [
        ("lstm", seq(layers.LSTM(H, return_sequences=True)), "keras.layers.LSTM", {"streaming": fwd}),
        ("gru_reset_after", seq(layers.GRU(H, return_sequences=True, reset_after=True)), "GRU(reset_after=True)",
         {"streaming": fwd}),
        ("gru_reset_before", seq(layers.GRU(H, return_sequences=True, reset_after=False)), "GRU(reset_after=False)",
         {"streaming": fwd}),
        ("bidirectional_lstm", seq(layers.Bidirectional(layers.LSTM(H, return_sequences=True))), "Bidirectional(LSTM)",
         {"streaming": bidir}),
        ("simplernn", seq(layers.SimpleRNN(H, return_sequences=True)), "SimpleRNN", {"streaming": fwd}),
    ]
    inp = keras.Input((None, I), name="x")
    h0, c0 = keras.Input((H,), name="h0"), keras.Input((H,), name="c0")
    y, h, c = layers.LSTM(H, return_sequences=True, return_state=True)(inp, initial_state=[h0, c0])
    models.append(("lstm_state_io", keras.Model([inp, h0, c0], [y, h, c]),
                   "LSTM with initial_state inputs and return_state=True (state carried as graph I/O)",
                   {"streaming": stream("a forward LSTM whose state is graph I/O (paired and carried)")}))
    # --- the patterns users bring (issue 9, point 7)
    models.append(("bidirectional_gru", seq(layers.Bidirectional(layers.GRU(H, return_sequences=True))),
                   "Bidirectional(GRU)", {"pattern": "bidirectional", "streaming": bidir}))
    for pad, dil in (("causal", 1), ("same", 1), ("causal", 2)):
        delay = 0 if pad == "causal" else dil * (3 - 1) // 2
        name = f"conv1d_{pad}{'_dilated' if dil > 1 else ''}_lstm"
        models.append((name, seq(layers.Conv1D(8, 3, padding=pad, dilation_rate=dil, activation="relu"),
                                 layers.LSTM(H, return_sequences=True)),
                       f"Conv1D(8, 3, padding={pad!r}, dilation_rate={dil}, relu) -> LSTM",
                       {"pattern": f"conv_{'causal' if pad == 'causal' else 'centred'}"
                                   f"{'_dilated' if dil > 1 else ''}",
                        "streaming": stream("a causal conv (left padding only) and a forward LSTM" if not delay else
                                            f"a 'same' conv: {delay} step(s) of right padding, then a forward LSTM",
                                            delay)}))
    models.append(("lstm_globalavgpool_dense", seq(layers.LSTM(H, return_sequences=True),
                                                   layers.GlobalAveragePooling1D(), layers.Dense(4)),
                   "LSTM -> GlobalAveragePooling1D -> Dense",
                   {"pattern": "mean_pool", "streaming": refuse("the mean over time needs the whole sequence")}))
    ids, xm = masked_examples()
    rnn = {"lstm": layers.LSTM, "gru": layers.GRU, "simplernn": layers.SimpleRNN}
    for kind, cls in rnn.items():
        models.append((f"embedding_maskzero_{kind}",
                       seq(layers.Embedding(20, 5, mask_zero=True), cls(H, return_sequences=True), tokens=True),
                       f"Embedding(20, 5, mask_zero=True) -> {cls.__name__}: token 0 is masked (the state is "
                       "carried over masked steps)",
                       {"pattern": "keras_mask_embedding", "feeds": {"ids": ids},
                        "streaming": stream("a forward recurrence; a masked step keeps the state (per step)")}))
        models.append((f"masking_{kind}", seq(layers.Masking(mask_value=0.0), cls(H, return_sequences=True)),
                       f"Masking(mask_value=0.) -> {cls.__name__}: all-zero steps are masked",
                       {"pattern": "keras_mask_masking", "feeds": {"x": xm},
                        "streaming": stream("a forward recurrence; a masked step keeps the state (per step)")}))
    if not legacy:
        models.append(("embedding_lstm", seq(layers.Embedding(20, 5), layers.LSTM(H, return_sequences=True),
                                             tokens=True),
                       "Embedding(20, 5) -> LSTM (no mask)", {"pattern": "embedding", "feeds": {"ids": ids},
                                                              "streaming": fwd}))
    # a Dense on every step: tf2onnx writes Keras' Tensordot, Reshape(x, [-1, F]) -> MatMul ->
    # Reshape(Shape(x)[:2] + [N]) (the converter marks the first Reshape: rnnengine_rows_view)
    models.append(("lstm_dense", seq(layers.LSTM(H, return_sequences=True), layers.Dense(5)),
                   "LSTM -> Dense(5) on every step", {"pattern": "dense_on_sequence", "streaming": fwd}))
    models.append(("gru_dense_softmax", seq(layers.GRU(H, return_sequences=True), layers.Dense(5, activation="softmax")),
                   "GRU -> Dense(5, softmax) on every step (keyword spotting)",
                   {"pattern": "dense_on_sequence", "streaming": fwd}))
    # a CRNN front end: Conv1D -> MaxPooling1D -> LSTM (tf2onnx writes the pool as a 2-D MaxPool
    # over (N, C, 1, L)); an AveragePooling1D(padding="same") with a stride pads by an amount that
    # depends on the whole sequence's length (auto_pad SAME_UPPER): whole sequences only
    models.append(("conv_maxpool_lstm_dense", seq(layers.Conv1D(8, 3, padding="same", activation="relu"),
                                                  layers.MaxPooling1D(2), layers.LSTM(H, return_sequences=True),
                                                  layers.Dense(5)),
                   "Conv1D(8, 3, padding='same', relu) -> MaxPooling1D(2) -> LSTM -> Dense(5)",
                   {"pattern": "conv_pool", "streaming": stream("a centred conv (1 step of look-ahead), a pool "
                                                                "reaching 1 step further, a forward LSTM", 2)}))
    models.append(("conv_avgpool_same_gru", seq(layers.Conv1D(8, 3, padding="causal", activation="relu"),
                                                layers.AveragePooling1D(3, strides=2, padding="same"),
                                                layers.GRU(H, return_sequences=True)),
                   "Conv1D(8, 3, padding='causal', relu) -> AveragePooling1D(3, strides=2, padding='same') -> GRU",
                   {"pattern": "conv_pool", "streaming": refuse("auto_pad SAME with stride 2 pads by an amount "
                                                                "that depends on the whole sequence's length")}))
    for name, model, notes, meta in models:
        if not selected(name):
            continue
        fname = f"{family}_tf2onnx_{name}_op17.onnx"
        path = os.path.join(OUT, fname)
        specs = [tf.TensorSpec((None,) + tuple(t.shape[1:]), t.dtype, name=t.name.split(":")[0])
                 for t in model.inputs]
        feeds = meta.get("feeds", {})
        args = [feeds.get(s.name) if s.name in feeds else
                np.random.default_rng(1).standard_normal((3, 5, I) if s.shape.rank == 3 else (3, H)).astype(np.float32)
                for s in specs]
        try:
            tf2onnx.convert.from_keras(model, input_signature=specs, opset=17, output_path=path)
            want = model(args if len(args) > 1 else args[0])
            want = [np.asarray(w) for w in (want if isinstance(want, (list, tuple)) else [want])]
            m = onnx.load(path)
            check_with_ort(path, {i.name: a for i, a in zip(m.graph.input, args)}, want)
        except Exception as e:
            failures.append((fname, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
            if os.path.exists(path):
                os.remove(path)
            continue
        ins = [(i.name, "state" if i.name in ("h0", "c0") else "tokens" if i.name == "ids" else "float", None)
               for i in m.graph.input]
        entry = manifest_entry(fname, f"{family}-tf2onnx", 17, notes, m, ins, args)
        if feeds:  # the example (with masked steps) the export was checked on, for the engine too
            meta["example_feeds"] = fname[:-len(".onnx")] + ".feeds.npz"
            np.savez_compressed(os.path.join(OUT, meta["example_feeds"]),
                                **{i.name: a for i, a in zip(m.graph.input, args)})
        finish_entry(entry, meta, name)
        entries.append(entry)
        print("ok  ", fname, os.path.getsize(path), "bytes")
    versions = {"tensorflow": tf.__version__, family: keras.__version__, "tf2onnx": tf2onnx.__version__}
    return failures, versions


def engine_check(entry, path, dims):
    """What this checkout's engine does with one file, step by step: converts? whole-sequence
    max error against onnxruntime; streamed max error against the whole-sequence result
    (or the engine's reason for not streaming). A streamed error above tolerance with no
    exception is a silent wrong answer and is said so."""
    import rnnengine
    from rnnengine.verify import TOLERANCE, verify
    out = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = rnnengine.convert(path)
    except Exception as e:
        out["convert"] = f"{type(e).__name__}: " + " ".join(str(e).split())[:200]
        return out
    out["convert"] = "ok"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = verify(model, path, dims, seed=1, chunks=(1, 4))
    except Exception as e:
        out["run"] = f"{type(e).__name__}: " + " ".join(str(e).split())[:200]
        if "ONNXRuntimeError" in out["run"]:  # onnxruntime cannot run it: what does the engine do alone?
            from rnnengine.verify import random_feeds
            try:
                model.run(random_feeds(model, dims, seed=1))
                out["engine_run"] = "runs without an error (onnxruntime cannot run the file)"
            except Exception as e2:
                out["engine_run"] = f"{type(e2).__name__}: " + " ".join(str(e2).split())[:200]
        return out
    out["whole_max_err"] = max(e["rel"] for e in rep["whole"].values())
    out["stream_max_err"] = None if rep["stream"] is None else max(e["rel"] for e in rep["stream"].values())
    out["stream_note"] = rep["stream_note"]
    tol = TOLERANCE["float32"]
    if out["stream_max_err"] is not None and not out["stream_max_err"] <= tol:
        out["silent_wrong_stream"] = (f"the engine streams this file without an error and the stream differs "
                                      f"from the whole-sequence result by {out['stream_max_err']:.2g}")
    elif out["stream_max_err"] is not None and entry.get("streaming", {}).get("expect") == "refuse":
        out["unexpected_stream"] = "the engine streams a file whose manifest says it should refuse"
    return out


def triage(manifest):
    """Runs the engine of this checkout over every pattern entry (the ones with "pattern"),
    with the corpus test itself (tests/test_corpus.py) plus, where the entry ships example
    inputs (masked steps), rnnengine.verify on those inputs. Entries that pass go to
    "models" (tested by CI); the others to "pending" with the engine's message in
    "engine_today". The original entries stay in "models" whatever happens (a failure
    there is a regression for the tests to show, not for this script to hide)."""
    import tempfile
    import pathlib
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import test_corpus
    import rnnengine
    from rnnengine.verify import verify, within_tolerance
    keep, pending, table = [], [], []
    for entry in manifest["models"] + manifest.get("pending", []):
        entry.pop("engine_today", None)
        entry.pop("engine_check", None)
        if "pattern" not in entry:
            keep.append(entry)
            continue
        path = os.path.join(OUT, entry["file"])
        entry["engine_check"] = engine_check(entry, path, test_corpus.dims_of(entry))
        try:
            with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                test_corpus.test_corpus_model_converts_and_matches_onnxruntime(entry, pathlib.Path(tmp))
            if entry.get("example_feeds"):
                feeds = dict(np.load(os.path.join(OUT, entry["example_feeds"])))
                model = rnnengine.convert(path)
                rep = verify(model, path, test_corpus.dims_of(entry), fixed=feeds, chunks=(1, 4))
                if not within_tolerance(rep):
                    raise AssertionError(f"differs from onnxruntime on the example inputs with masked steps: "
                                         f"whole {rep['whole']}, stream {rep['stream']} ({rep['stream_note']})")
            outcome = "ok"
        except Exception as e:
            outcome = f"{type(e).__name__}: " + " ".join(str(e).split())[:300]
        table.append((entry["file"], outcome))
        if outcome == "ok":
            keep.append(entry)
        else:
            entry["engine_today"] = outcome
            pending.append(entry)
    manifest["models"] = sorted(keep, key=lambda e: e["file"])
    manifest["pending"] = sorted(pending, key=lambda e: e["file"])
    for f, outcome in table:
        print(f"{f:70s} {outcome}")
    print(f"{sum(o == 'ok' for _, o in table)} of {len(table)} pattern models pass; the rest are in 'pending'")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch", action="store_true", help="export the PyTorch models")
    ap.add_argument("--keras", action="store_true", help="export the Keras 3 models through tf2onnx")
    ap.add_argument("--keras2", action="store_true", help="export the Keras 2 (tf_keras) models through tf2onnx")
    ap.add_argument("--triage", action="store_true",
                    help="run this checkout's engine over the pattern models and sort them into 'models' "
                         "(pass) and 'pending' (fail, with the message); needs rnnengine installed")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="export only the models whose name contains NAME (repeatable), keeping every other "
                         "file and entry as it is: re-exporting a family renames nodes in every file")
    args = ap.parse_args()
    ONLY[:] = args.only
    if not (args.torch or args.keras or args.keras2 or args.triage):
        ap.error("say --torch, --keras, --keras2 (Keras 2 in a process of its own) and/or --triage")
    if args.keras2 and args.keras:
        ap.error("--keras2 needs a process of its own (it switches TensorFlow to tf_keras)")
    os.makedirs(OUT, exist_ok=True)
    manifest = json.load(open(MANIFEST)) if os.path.exists(MANIFEST) else {"generated_with": {}, "models": []}
    manifest.setdefault("pending", [])
    failures = []
    for flag, prefix, fn in ((args.torch, "torch_", export_torch), (args.keras, "keras3", export_keras),
                             (args.keras2, "keras2", lambda e: export_keras(e, legacy=True))):
        if not flag:
            continue
        import onnx
        import onnxruntime
        manifest["generated_with"].update({"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__})
        def replaced(f):
            return f.startswith(prefix) and selected(f)
        for f in os.listdir(OUT):
            if replaced(f) and f.endswith((".onnx", ".npz")):
                os.remove(os.path.join(OUT, f))
        for key in ("models", "pending"):
            manifest[key] = [e for e in manifest[key] if not replaced(e["file"])]
        manifest["export_failures"] = [f for f in manifest.get("export_failures", []) if not replaced(f[0])]
        entries = []
        res = fn(entries)
        if isinstance(res, tuple):
            res, versions = res
            manifest["generated_with"].update(versions)
        else:
            import torch
            manifest["generated_with"]["torch"] = torch.__version__
        failures += res
        # new pattern entries wait in "pending" until --triage has run the engine over them
        manifest["models"] += [e for e in entries if "pattern" not in e]
        manifest["pending"] += [e for e in entries if "pattern" in e]
        manifest["export_failures"] += [list(f) for f in res]
    if args.triage:
        triage(manifest)
    for key in ("models", "pending", "export_failures"):
        manifest[key].sort(key=lambda e: e["file"] if isinstance(e, dict) else e[0])
    manifest["pending_note"] = ("'pending' holds exports of the patterns users bring that this engine does not yet "
                                "convert or match (engine_today says how it fails); tools/make_corpus.py --triage "
                                "moves those that pass into 'models', which the corpus tests run")
    with open(MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
    listed = manifest["models"] + manifest["pending"]
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"{len(manifest['models'])} models, {len(manifest['pending'])} pending, {total:,} bytes in all; "
          f"{len(failures)} exports failed in this run:")
    for f, why in failures:
        print("  ", f, "--", why)
    assert len(listed) == len({e["file"] for e in listed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
