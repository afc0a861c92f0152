"""`python -m polyinr` is the `polyinr` command (and what torchrun launches)."""

import sys

from polyinr.commands.cli import main

sys.exit(main())
