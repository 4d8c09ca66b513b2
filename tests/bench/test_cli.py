"""A benchmark given a checkpoint or setting it cannot use says so in one message and exits 2, not a traceback."""

import json
import subprocess
import sys

import pytest

from bench.cli import EXIT_SETUP_ERROR, SetupError, run
from engine.loader import CheckpointError
from tests.paths import REPO


@pytest.mark.parametrize("error", [CheckpointError("/data/ckpt: shard listed in the index is missing"),
                                   PermissionError(13, "Permission denied"), SetupError("the server exited")])
def test_setup_errors_are_one_message_and_exit_2(capsys, error):
    def main():
        raise error

    assert run(main) == EXIT_SETUP_ERROR
    assert capsys.readouterr().err == f"error: {error}\n"


def test_the_measured_codes_own_failures_still_raise():
    def main():
        raise ZeroDivisionError("a bug in what is measured")

    with pytest.raises(ZeroDivisionError):
        run(main)
    assert run(lambda: 0) == 0


def test_a_benchmark_stopped_by_ctrl_c_says_so_in_one_line(capsys):
    """Ctrl+C during a benchmark run through bench.cli.run was a KeyboardInterrupt traceback."""
    from engine.command import EXIT_INTERRUPTED

    def main():
        raise KeyboardInterrupt

    assert run(main) == EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == "stopped (Ctrl+C)"


def test_a_benchmark_given_another_models_checkpoint_names_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64}))
    r = subprocess.run([sys.executable, "bench/tiny_decode.py", "--model", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == EXIT_SETUP_ERROR
    assert "Traceback" not in r.stderr and f"{tmp_path / 'config.json'}: neither a Ming" in r.stderr
