"""The rnnengine command: demo on the bundled model, help texts."""
import subprocess
import sys

import numpy as np

import rnnengine
from rnnengine import cli


def test_bundled_demo_model_is_the_committed_generator_output():
    """tools/make_demo_model.py rebuilds exactly the bundled weights."""
    import importlib.util
    import os
    import onnx
    from onnx import numpy_helper

    path = os.path.join(os.path.dirname(__file__), "..", "tools", "make_demo_model.py")
    spec = importlib.util.spec_from_file_location("make_demo_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    built = {t.name: numpy_helper.to_array(t) for t in mod.build().graph.initializer}
    shipped = {t.name: numpy_helper.to_array(t) for t in onnx.load(cli.DEMO_MODEL).graph.initializer}
    assert built.keys() == shipped.keys()
    for k in built:
        np.testing.assert_array_equal(built[k], shipped[k])


def test_demo_runs_and_agrees_with_onnxruntime(capsys):
    assert cli.main(["demo", "--steps", "50", "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime" in out and "OK" in out and "per-step time" in out


def test_demo_model_loads_with_state_inputs():
    m = rnnengine.load_onnx(cli.DEMO_MODEL)
    assert [k for k, _, _ in m.onnx_info["state_inputs"]] == [0, 0, 1, 1]
    assert m.streamable


def test_console_help(tmp_path):
    # run outside the source tree, so the installed package is the one imported
    r = subprocess.run([sys.executable, "-m", "rnnengine.cli", "demo", "--help"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 0 and "--steps" in r.stdout
    r = subprocess.run([sys.executable, "-m", "rnnengine.cli"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "demo" in r.stdout
