"""Trains the bundled demo model, rnnengine/data/demo_charlm.onnx: a character-level LSTM
language model (2 layers, hidden 192, embedding 32), trained by rnnengine's own C training
path, exported to ONNX with its state as graph inputs/outputs, vocabulary in its metadata.

    python tools/train_demo_model.py [--steps 1500]

Corpus: the docstrings of about a hundred modules of the Python standard library of the
running interpreter, read with inspect.getdoc, so the text is on every machine with Python
and nothing is downloaded. Licence: the Python Software Foundation License Version 2, which
permits use, modification and distribution of derivative works provided the PSF's copyright
notice and the licence are retained; the model's metadata ("rnnengine.notes") carries the
notice: "Copyright (c) 2001 Python Software Foundation; All Rights Reserved". Only
printable ASCII characters and newlines are kept.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "rnnengine", "data", "demo_charlm.onnx")
MODULES = """os json re collections itertools functools pathlib argparse subprocess threading typing dataclasses
logging unittest email http.client urllib.request textwrap string random statistics fractions decimal datetime
calendar heapq bisect copy pickle shutil tempfile glob csv sqlite3 zipfile tarfile gzip hashlib hmac secrets
socket ssl select asyncio concurrent.futures contextlib abc enum numbers math cmath operator inspect ast dis
tokenize pdb timeit trace doctest difflib pprint reprlib weakref types io codecs locale gettext shlex
configparser tomllib xml.dom.minidom html.parser mimetypes base64 binascii struct array queue sched signal
platform sysconfig venv zipapp wave colorsys imaplib smtplib ftplib poplib uuid ipaddress graphlib
zoneinfo""".split()
NOTES = ("Character-level LSTM trained by rnnengine (tools/train_demo_model.py) on docstrings of the Python "
         "standard library. Training text: Copyright (c) 2001 Python Software Foundation; All Rights Reserved; "
         "used under the PSF License Version 2.")


def corpus():
    parts = []
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # a module this interpreter lacks
            continue
        docs = [inspect.getdoc(mod) or ""]
        for key, obj in sorted(vars(mod).items()):
            if not key.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)) \
                    and getattr(obj, "__module__", "") == mod.__name__:
                docs.append(inspect.getdoc(obj) or "")
        parts.append("\n\n".join(d for d in docs if d))
    text = "\n\n".join(parts)
    return "".join(ch for ch in text if ch == "\n" or 32 <= ord(ch) < 127)


def main():
    from rnnengine.train import Network, char_vocab, evaluate, export_char_lm, fit
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--out", default=OUT)
    a = ap.parse_args()
    text = corpus()
    vocab, ids = char_vocab(text)
    n_val = len(ids) // 20
    train, val = ids[:-n_val], ids[-n_val:]
    print(f"corpus: {len(text):,} characters, vocabulary {len(vocab)}", file=sys.stderr)
    net = Network("LSTM", len(vocab), 192, len(vocab), num_layers=2, embedding=32, seed=0)
    t0 = time.perf_counter()
    fit(net, train, None, "lm", a.steps, batch_size=32, seq_len=64, lr=3e-3, clip_norm=1.0, seed=0, progress=True)
    vloss = evaluate(net, "lm", val[:20000])
    print(f"trained in {time.perf_counter() - t0:.0f} s; validation loss {vloss:.3f} nats/char", file=sys.stderr)
    export_char_lm(net, vocab, a.out, NOTES + f" Validation loss {vloss:.3f} nats/char after {a.steps} steps.")
    print(f"wrote {a.out} ({os.path.getsize(a.out):,} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
