"""What a benchmark's command line does with a checkpoint or a setting it cannot use (`--model` of a broken
checkpoint, a cache folder that cannot be written, an engine server that does not start): one message naming
it, as the engine words it, and exit 2, not a traceback. The measured code's own failures still raise."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.command import run_command  # noqa: E402
from engine.errors import MingError  # noqa: E402
from engine.placement.planner import PlanError  # noqa: E402

EXIT_SETUP_ERROR = 2


class SetupError(Exception):
    """The benchmark could not set up what it measures (e.g. the engine server it starts exited)."""


# MingError: the checkpoint, its config or tokenizer; PlanError: the model does not fit; OSError: a file or folder
SETUP_ERRORS = (MingError, PlanError, OSError, SetupError)


def run(main: Callable[[], int]) -> int:
    """main()'s exit code, or EXIT_SETUP_ERROR after printing the setup error it raised; stopped by Ctrl+C,
    SIGTERM or a closed stdout, what every engine command does (engine.command: one line, 130 / 143 / 141)."""
    return run_command(_saying_setup_errors, main)


def _saying_setup_errors(main: Callable[[], int]) -> int:
    try:
        return main()
    except SETUP_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_SETUP_ERROR
