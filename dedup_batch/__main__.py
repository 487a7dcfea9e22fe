"""``python -m dedup_batch``: the same as the ``dedup-batch`` command."""

import sys

from .cli import main

sys.exit(main())
