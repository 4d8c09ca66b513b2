"""`python -m engine.parity`: compare the engine with the upstream reference fixtures (the command line of engine.tools.parity)."""

import sys

from engine.tools.parity import main

if __name__ == "__main__":
    from engine.command import run_command

    sys.exit(run_command(main))
