"""Run the command line as ``python -m replicator``."""

from __future__ import annotations

import sys

from replicator.cli import main

sys.exit(main())
