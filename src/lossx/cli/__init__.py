"""The `lossx` command line: parse, call lossx.build / lossx.runtime / lossx.training /
lossx.parity, render.

Every value is checked before any work, and before torch is imported: torch is imported only
by the commands that need it (export, check, eval --compare-eager, train --engine torch), and
in an install without the `export` extra they stop with one line. Neither is numpy nor ONNX
Runtime imported to parse options, so `--help` and bad usage answer at once.

Exit codes (lossx.errors): 0 success, 1 parity failure, 2 bad usage or input, 3 environment,
4 export failed (a valid graph could not be made), 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM). Every error is one line on stderr.
"""

# each module registers its commands with the group
from lossx.cli import check, evaluate, export, train  # noqa: F401
from lossx.cli.app import main

__all__ = ["main"]
