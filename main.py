"""PDT Workbench: `python main.py` (TUI with a terminal; unattended under torchrun or without one)."""

import sys

from pdt.cli import main

if __name__ == "__main__":
    sys.exit(main())
