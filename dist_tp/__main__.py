"""``python -m dist_tp``: the same command line as ``dist-tp``."""

import sys

from dist_tp.cli import main

sys.exit(main())
