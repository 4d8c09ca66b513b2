"""`python -m engine.plan`: where experts and modules go on your GPUs and host (the command line of engine.placement.planner)."""

import sys

from engine.placement.planner import main

if __name__ == "__main__":
    from engine.command import run_command

    sys.exit(run_command(main))
