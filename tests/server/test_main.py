"""`python -m engine.server` start-up: a model that cannot be loaded is a clear error, not a traceback."""

from __future__ import annotations

from engine.server.__main__ import main


def test_unloadable_model_is_a_clear_error(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "could not load the model" in err and "missing" in err and "Traceback" not in err
