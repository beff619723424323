"""`python -m rnnengine ...` runs the command-line tool, as the `rnnengine` command does."""
import sys

from .cli import main

sys.exit(main())
