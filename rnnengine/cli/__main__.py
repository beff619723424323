"""`python -m rnnengine.cli ...`: the command-line tool."""
import sys

from rnnengine.cli.main import main

sys.exit(main())
