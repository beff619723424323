"""Test set-up: `import oracle` from this folder, and the installed rnnengine under test."""
import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # for `import oracle`

# `python -m pytest` from the repository root puts the root first on sys.path, so `import
# rnnengine` would find the source tree, which has no compiled core after a plain
# `pip install .`. Then test the installed package instead (an in-place build, as
# `pip install -e .` makes, is used as it is).
if not glob.glob(os.path.join(ROOT, "rnnengine", "_core*.so")) and not glob.glob(
        os.path.join(ROOT, "rnnengine", "_core*.pyd")):
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]
    for name in [m for m in sys.modules if m == "rnnengine" or m.startswith("rnnengine.")]:
        del sys.modules[name]
