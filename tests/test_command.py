"""engine.command: a command line stopped by Ctrl+C, SIGTERM or a closed stdout ends with one line (or none) and the
shell's code for it, never a traceback; run as the user runs it (`python -m engine.generate` in a subprocess)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from engine.command import EXIT_INTERRUPTED, EXIT_OUTPUT_CLOSED, EXIT_TERMINATED, run_command
from tests.paths import REPO

STARTED_TIMEOUT_S = 120  # the tiny model's load and first token, on a loaded 2-core machine
LONG_REPLY = "4000"  # tokens: the reply is still streaming when the test stops it


def _ctrl_c_as_in_a_terminal() -> None:
    """The command starts with Ctrl+C at its default, as from a terminal, even where the test run itself ignores
    SIGINT (started in the background, `cmd &`, as CI may be): a child would inherit the ignore, never see the
    Ctrl+C the test sends, and stream its whole reply (43 s) before exiting 0."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _generate(tiny_checkpoint) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.generate", "--model", str(tiny_checkpoint), "--prompt", "hi",
                             "--max-new-tokens", LONG_REPLY], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=_ctrl_c_as_in_a_terminal)


@pytest.mark.parametrize("sig, code, line", [(signal.SIGINT, EXIT_INTERRUPTED, "stopped (Ctrl+C)"),
                                             (signal.SIGTERM, EXIT_TERMINATED, "stopped (SIGTERM)")])
def test_a_reply_stopped_by_a_signal_ends_in_one_line_and_the_signals_exit_code(tiny_checkpoint, sig, code, line):
    """Ctrl+C while a reply streamed was a KeyboardInterrupt traceback; SIGTERM killed the process mid-write."""
    proc = _generate(tiny_checkpoint)
    try:
        assert proc.stdout.read(1)  # the reply has started
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=STARTED_TIMEOUT_S)
    finally:
        proc.kill()
    text = err.decode()
    assert proc.returncode == code and text.rstrip().endswith(line) and "Traceback" not in text, text


def test_a_reader_that_stops_reading_ends_the_reply_quietly(tiny_checkpoint):
    """`python -m engine.generate ... | head -c 1` ended in a BrokenPipeError traceback."""
    proc = _generate(tiny_checkpoint)
    try:
        assert proc.stdout.read(1)
        proc.stdout.close()  # what head does after its first byte
        err = proc.stderr.read().decode()
        proc.wait(timeout=STARTED_TIMEOUT_S)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_OUTPUT_CLOSED and "Traceback" not in err and "Error" not in err, err


def test_a_main_that_finishes_keeps_its_exit_code_and_one_that_is_interrupted_gets_130(capsys):
    assert run_command(lambda: 3) == 3

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert run_command(interrupted) == EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == "stopped (Ctrl+C)"


COMMANDS = ["engine.generate", "engine.imagine", "engine.tts", "engine.tiny", "engine.plan", "engine.inspect",
            "engine.parity", "engine.server", "engine.tools.inspect", "engine.tools.parity",
            "engine.tools.frontend_parity"]


@pytest.fixture(scope="module")
def help_answers() -> dict[str, Future]:
    """`python -m X --help` of every command (with the modules it imports listed on stderr), as many at once as
    there are cores (each spends seconds importing torch); each test waits for its own."""
    def answer(module: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-X", "importtime", "-m", module, "--help"], cwd=REPO,
                              capture_output=True, text=True, timeout=STARTED_TIMEOUT_S)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        yield {module: pool.submit(answer, module) for module in COMMANDS}


@pytest.mark.parametrize("module", COMMANDS)
def test_every_command_answers_help(module, help_answers):
    """`python -m engine.tools.frontend_parity --help` looked for fixtures in a folder named '--help' (exit 1); every
    command importing the language model imported torch._dynamo's compiler (by torch.nn.attention.bias), as long
    again as torch's own import, before saying anything."""
    r = help_answers[module].result()
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m engine."), r.stderr[-2000:]
    assert not re.search(r"\| +torch\._dynamo\.convert_frame$", r.stderr, re.MULTILINE), "imports torch._dynamo's compiler"


def test_a_dash_reads_the_text_from_stdin(monkeypatch):
    import argparse
    import io

    from engine.command import text_argument

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("a cup\nof tea\n".encode())))
    ap = argparse.ArgumentParser()
    assert text_argument(ap, "--text", "-") == "a cup\nof tea" and text_argument(ap, "--text", "-x") == "-x"


CTRL_C_DURING_TORCH_IMPORT = '''
import os, signal, sys


class CtrlCWhileTorchImports:
    """Presses Ctrl+C (SIGINT to this process) the moment the command first imports torch."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None


sys.meta_path.insert(0, CtrlCWhileTorchImports())
'''


@pytest.mark.parametrize("module", ["engine.generate", "engine.tts"])
def test_ctrl_c_while_a_command_still_imports_torch_ends_in_one_line(tmp_path, module):
    """Ctrl+C in the seconds `python -m engine.X` spends importing torch, before run_command runs, printed a
    traceback from inside the import system (the shell's code was right: 130)."""
    (tmp_path / "sitecustomize.py").write_text(CTRL_C_DURING_TORCH_IMPORT)
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=STARTED_TIMEOUT_S, env={**os.environ, "PYTHONPATH": str(tmp_path)},
                          preexec_fn=_ctrl_c_as_in_a_terminal)
    assert done.returncode in (EXIT_INTERRUPTED, -signal.SIGINT), done.stderr
    assert done.stderr.strip() == "stopped (Ctrl+C)" and done.stdout == ""
