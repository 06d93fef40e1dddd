"""``python -m agoq.cli`` runs the ``agoq`` command."""

import sys

from agoq.cli import main

sys.exit(main())
