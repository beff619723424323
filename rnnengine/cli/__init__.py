"""The ``rnnengine`` command: main.py parses the arguments and runs each subcommand,
bench.py the ``bench`` subcommand."""
from rnnengine.cli.main import DEMO_CHARLM, DEMO_MODEL, build_parser, main

__all__ = ["main", "build_parser", "DEMO_MODEL", "DEMO_CHARLM"]
