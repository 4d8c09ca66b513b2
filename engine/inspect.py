"""`python -m engine.inspect`: parameter counts and bytes per component, built on the meta device (the command line of engine.tools.inspect)."""

import sys

from engine.tools.inspect import main

if __name__ == "__main__":
    from engine.command import run_command

    sys.exit(run_command(main))
