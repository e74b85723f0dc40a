"""``python -m http_gateway --router HOST:PORT --port 8000`` (see ``--help``)."""

import sys

from http_gateway.cli import main

sys.exit(main())
