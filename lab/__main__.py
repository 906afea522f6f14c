"""``python -m lab`` is the same as the ``lab`` script (the GPU box runs it this way)."""

import sys

from lab.cli import main

sys.exit(main())
