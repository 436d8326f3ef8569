"""``python -m sftbench.report``: the command line of ``sftbench.report.cli``."""
import sys

from sftbench.report.cli import main

sys.exit(main())
