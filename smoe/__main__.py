"""``python -m smoe`` is the ``smoe`` command."""

import sys

from smoe.cli import main

sys.exit(main())
