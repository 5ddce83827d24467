"""``python -m deepatlas`` = the ``deepatlas`` command."""

import sys

from .cli import main

sys.exit(main())
