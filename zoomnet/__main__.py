"""``python -m zoomnet``: the command line."""

import sys

from zoomnet.cli import main

sys.exit(main())
