"""`python -m polyinr` is the `polyinr` command (and what torchrun launches)."""

import sys

from polyinr.cli import main

sys.exit(main())
