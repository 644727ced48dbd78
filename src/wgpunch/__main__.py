"""`python -m wgpunch`: the same as the `wgpunch` command."""

import sys

from .cli import main

sys.exit(main())
