"""`python -m engine.server` start-up: a model that cannot be loaded is a clear error, not a traceback."""

from __future__ import annotations

from engine.server.__main__ import main


def test_unloadable_model_is_a_clear_error(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "could not load the model" in err and "missing" in err and "Traceback" not in err


def test_a_model_too_big_for_this_cpu_is_refused_before_loading(tiny_checkpoint, capsys, monkeypatch):
    from engine.placement import auto
    monkeypatch.setattr(auto, "host_available_bytes", lambda: 10**6)
    assert main(["--model", str(tiny_checkpoint), "--device", "cpu", "--expert-dtype", "int4",
                 "--linear-dtype", "int8"]) == 2
    err = capsys.readouterr().err
    assert "does not fit in this machine's memory" in err and "0.00 GB is available" in err and "Traceback" not in err
