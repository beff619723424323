"""README's Python examples run as written (a newcomer pastes them): each fenced block below,
found by its first line, is executed as it stands."""
import importlib.util
import os

import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def block(first_line):
    """The ```python block of README.md that starts with first_line."""
    text = open(README, encoding="utf-8").read()
    start = text.index("```python\n" + first_line) + len("```python\n")
    return text[start:text.index("```", start)]


def test_the_batcher_example_runs():
    ns = {}
    exec(compile(block("import asyncio\nimport numpy as np\nimport rnnengine"), "README batcher", "exec"), ns)
    assert ns["y"].shape == (32,) and ns["ys"].shape == (5, 32)


@pytest.mark.skipif(importlib.util.find_spec("silero_vad") is None,
                    reason="silero-vad is not installed (README's test command installs it)")
def test_the_silero_vad_example_runs():
    ns = {}
    exec(compile(block("import importlib.util, os\nimport numpy as np"), "README silero-vad", "exec"), ns)
    assert 0.0 <= float(ns["p"]) <= 1.0 and ns["vad"].state_pairs == [("state", "stateN")]
