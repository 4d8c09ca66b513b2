"""How every command line of the engine ends when the user or the shell stops it (torch-free): Ctrl+C and SIGTERM
end it with one line on stderr and the shell's code for that signal, after `finally` blocks have run (an output
file being written is closed whole), and a reader that stopped reading stdout (`... | head -1`) ends it quietly.
None of them is a Python traceback. Each `python -m engine.X` runs its `main` through `run_command`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.errors import EXIT_FAILED, EXIT_INPUT

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130: stopped by Ctrl+C
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143: stopped by SIGTERM (kill, a service manager)
EXIT_OUTPUT_CLOSED = 128 + signal.SIGPIPE  # 141: the reader of stdout went away
EXIT_CODES_HELP = (f"exit codes: 0 = done, {EXIT_INPUT} = a flag, an input file or the model was refused "
                   f"(nothing was written), {EXIT_FAILED} = the work failed after it started, {EXIT_INTERRUPTED} = "
                   f"stopped by Ctrl+C, {EXIT_TERMINATED} = by SIGTERM, {EXIT_OUTPUT_CLOSED} = stdout was closed "
                   "(| head).")


STOPPED_BY_CTRL_C = "\nstopped (Ctrl+C)"
STOPPED_BY_SIGTERM = "\nstopped (SIGTERM)"


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like Ctrl+C's KeyboardInterrupt (not an Exception: no handler of the
    command's own takes it for a failure of its work)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that flushing what is still buffered at exit raises nothing more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


@contextmanager
def sigterm_raises_terminated() -> Iterator[None]:
    """Within: SIGTERM raises Terminated in the main thread, so `finally` blocks run as for Ctrl+C (elsewhere than
    the main thread, where no handler can be set, SIGTERM keeps its default)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run_command(main: Callable[..., int], *args) -> int:
    """main(*args)'s exit code; EXIT_INTERRUPTED, EXIT_TERMINATED or EXIT_OUTPUT_CLOSED when it was stopped."""
    try:
        with sigterm_raises_terminated():
            code = main(*args)
            sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
        return code
    except KeyboardInterrupt:
        print(STOPPED_BY_CTRL_C, file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(STOPPED_BY_SIGTERM, file=sys.stderr)
        return EXIT_TERMINATED
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_OUTPUT_CLOSED


def interrupts_end_quietly() -> None:
    """Ctrl+C before `run_command` has started (while `python -m engine.X` still imports torch, seconds) ends the
    command with run_command's one line instead of a traceback from inside the import system; the interpreter
    still exits by SIGINT, so the shell sees 130 as after it. engine/__init__.py calls this for `python -m`."""
    previous = sys.excepthook

    def one_line_for_ctrl_c(kind, value, traceback) -> None:
        if issubclass(kind, KeyboardInterrupt):
            print(STOPPED_BY_CTRL_C, file=sys.stderr)
        else:
            previous(kind, value, traceback)

    sys.excepthook = one_line_for_ctrl_c


def output_file_problem(out: Path, makes_folders: bool = False) -> str | None:
    """Why a command cannot write its output file at `out` (None: it can be tried), said before the work starts:
    a folder given as the file, a folder that does not exist (unless the command `makes_folders`: then the
    nearest existing one must be a folder) or cannot be written."""
    if out.is_dir():
        return "is a folder: give a file name in it"
    folder = out.parent
    while makes_folders and not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file, not a folder" if folder.exists() else f"the folder {folder} does not exist"
    if not os.access(folder, os.W_OK):
        return f"the folder {folder} cannot be written to"
    return None


def text_argument(ap: argparse.ArgumentParser, flag: str, value: str | None) -> str | None:
    """A text flag's value, or for '-' the text on stdin (one final newline dropped); bytes that are not UTF-8 are a
    usage error naming the flag (exit 2)."""
    if value != "-":
        return value
    try:
        return sys.stdin.buffer.read().decode("utf-8").removesuffix("\n")
    except UnicodeDecodeError as e:
        ap.error(f"{flag} -: stdin is not UTF-8 text ({e.reason} at byte {e.start})")
