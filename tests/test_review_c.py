"""Regressions from a review of the C written for threads (src_c/pool.c), packed convs
(src_c/conv.c) and mapped panels (rnn_cell_create_mapped, rnnengine/format/panels.py)."""
import json
import os
import shutil
import struct

import numpy as np
import pytest

import rnnengine
from rnnengine.format import panels
from rnnengine.format.weightfile import FormatError

rng = np.random.default_rng(2026)


def _shared_lstm(tmp_path, H=20, I=6):
    W = rng.standard_normal((1, 4 * H, I)).astype(np.float32)
    R = rng.standard_normal((1, 4 * H, H)).astype(np.float32) * 0.3
    B = rng.standard_normal((1, 8 * H)).astype(np.float32)
    path = str(tmp_path / "m.rnne")
    rnnengine.save(rnnengine.Model([rnnengine.LSTM(W, R, B)]), path)
    return path


def _rp_offset(cache):
    """The file offset of the Rp panels in a panel cache."""
    with open(cache, "rb") as f:
        head = f.read(panels.HEADER.size)
        jsize, data_off = struct.unpack_from("<QQ", head, 16)
        doc = json.loads(f.read(jsize))
    return data_off + next(e for e in doc["entries"] if e["which"] == "Rp")["offset"]


@pytest.mark.parametrize("how", ["rewrite", "grow", "rename"])
def test_panel_cache_changed_on_disk_while_mapped(tmp_path, how):
    """A stack reads its panels from the cache's pages for as long as the model lives
    (rnn_cell_create_mapped borrows them; they were compared with a packing only when the
    stack was made). A cache changed in place afterwards (cp or shutil.copyfile over it, an
    editor) must not silently change the numbers: like a mapped weight file, every run and
    stream step after the change raises FormatError. A cache renamed over it (how rnnengine
    writes one) is no change: the map keeps the old file."""
    path = _shared_lstm(tmp_path)
    cache = path + ".panels"
    m = rnnengine.load(path, shared=True)
    X = rng.standard_normal((5, 1, 6)).astype(np.float32)
    want = m.run(X)
    assert all(s.mapped for _, s in m._stacks.values())
    s = m.stream()
    assert np.array_equal(s.step(X[0]), want[0])
    before = os.stat(cache)
    if how == "rename":  # another process's cache renamed over the name (a new inode)
        other = str(tmp_path / "other.panels")
        shutil.copyfile(cache, other)
        with open(other, "r+b") as f:
            f.seek(_rp_offset(other) + 3 * 64 + 1)
            f.write(b"\x7f")
        os.replace(other, cache)
    else:  # the same inode written again: one byte of the recurrent panels differs
        with open(cache, "r+b") as f:
            f.seek(_rp_offset(cache) + 3 * 64 + 1)
            f.write(b"\x7f")
            if how == "grow":
                f.seek(0, os.SEEK_END)
                f.write(bytes(64))
        # a later write's time (the file system's clock may not have ticked since the load)
        os.utime(cache, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    if how == "rename":
        assert np.array_equal(m.run(X), want)
        assert np.array_equal(s.step(X[1]), want[1])
        return
    with pytest.raises(FormatError, match="panel cache .* rewritten .*load the model again"):
        m.run(X)
    with pytest.raises(FormatError, match="panel cache"):
        s.step(X[1])
