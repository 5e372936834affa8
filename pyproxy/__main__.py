"""`python -m pyproxy` runs the same CLI as the `pyproxy` command."""

import sys

from pyproxy.cli import main

sys.exit(main())
