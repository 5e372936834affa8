"""`python -m pyproxy.explain explain|trace ARGS`: the commands without pyproxy's CLI."""

import sys

from pyproxy.explain.cli import run

sys.exit(run(sys.argv[1:]))
