"""Helpers the CLI subcommands share (main.py, bench.py)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

from rnnengine import convert, load
from rnnengine.format import weightfile as fileformat

if TYPE_CHECKING:  # the runtime needs the compiled core, which `rnnengine --help` does not
    from rnnengine.runtime.base import Model


def _kv(items: list[str] | None, what: str, cast: Callable[[str], Any] = str) -> dict[str, Any]:
    """NAME=VALUE arguments as a dict (values through ``cast``)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{what} must look like NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = cast(v)
    return out


def _is_weight_file(path: str) -> bool:
    """True when the file starts with the weight file's magic bytes."""
    with open(path, "rb") as f:
        return f.read(len(fileformat.MAGIC)) == fileformat.MAGIC


def _load_any(path: str, fixed: dict[str, Any] | None = None) -> "Model":
    """A weight file, or an ONNX file converted in memory."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if _is_weight_file(path):
        if fixed:
            raise ValueError("--input NAME=VALUE fixes inputs at conversion; this file is already converted")
        return load(path)
    return convert(path, fixed_inputs=fixed)
