"""`python -m rnnengine ...` runs the command-line tool, as the `rnnengine` command does."""
import sys

from rnnengine.cli.main import main

sys.exit(main())
