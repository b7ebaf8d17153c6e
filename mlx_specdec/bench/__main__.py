"""`python -m mlx_specdec.bench`: `mlx-specdec bench` without the other subcommands."""

import sys

from .cli import main

sys.exit(main())
