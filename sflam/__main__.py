"""`python -m sflam ...`: the same command line as the `sflam` console script."""

import sys

from sflam.cli import main

sys.exit(main())
