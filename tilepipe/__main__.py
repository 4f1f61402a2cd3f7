"""``python -m tilepipe``: the ``tilepipe`` command (torchrun and subprocesses start it this way)."""

import sys

from tilepipe.cli import main

sys.exit(main())
