"""`python -m engine.server` start-up: a model that cannot be loaded is a clear error, not a traceback."""

from __future__ import annotations

import pytest

from engine.server.__main__ import main


def test_unloadable_model_is_a_clear_error(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing"), "--port", "0"]) == 2  # (any free port: 8000 may be taken)
    err = capsys.readouterr().err
    assert "could not load the model" in err and "missing" in err and "Traceback" not in err


def test_a_model_too_big_for_this_cpu_is_refused_before_loading(tiny_checkpoint, capsys, monkeypatch):
    from engine.placement import auto
    monkeypatch.setattr(auto, "host_available_bytes", lambda: 10**6)
    assert main(["--model", str(tiny_checkpoint), "--device", "cpu", "--expert-dtype", "int4",
                 "--linear-dtype", "int8", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "does not fit in this machine's memory" in err and "0.00 GB is available" in err and "Traceback" not in err


def _no_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the address was checked")


def test_a_port_in_use_is_refused_before_the_model_loads(capsys, monkeypatch):
    import socket

    from engine.runtime import Engine
    monkeypatch.setattr(Engine, "load", _no_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--port {port}" in err and "in use" in err and "Traceback" not in err


def test_an_address_or_port_that_cannot_be_listened_on_is_named_before_the_model_loads(capsys, monkeypatch):
    from engine.runtime import Engine
    monkeypatch.setattr(Engine, "load", _no_load)
    assert main(["--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err
    assert main(["--host", "no such host!", "--token", "t"]) == 2
    err = capsys.readouterr().err
    assert "--host no such host!" in err and "Traceback" not in err


def test_port_0_prints_the_url_it_serves_on(tiny_checkpoint):
    """--port 0 takes any free port: the line the server prints names that port (it said :0)."""
    import os
    import re
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx

    env = {k: v for k, v in os.environ.items() if k != "MING_SERVER_TOKEN"}
    proc = subprocess.Popen([sys.executable, "-m", "engine.server", "--model", str(tiny_checkpoint), "--port", "0",
                             "--threads", "1"], cwd=Path(__file__).resolve().parents[2], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if line.startswith("serving "):
                break
        url = re.search(r"on (http://127\.0\.0\.1:(\d+))", line)
        assert url and url[2] != "0", line
        deadline = time.monotonic() + 60  # (uvicorn starts listening just after the line)
        while True:
            try:
                assert httpx.get(f"{url[1]}/health", timeout=5).status_code == 200
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("device", ["bogus", "cuda:99"])
def test_an_unusable_device_is_refused_before_the_model_loads(capsys, monkeypatch, device):
    """`--device bogus` was a torch RuntimeError traceback, `--device cuda` on a machine without CUDA an
    AssertionError traceback from inside the load."""
    from engine.runtime import Engine
    monkeypatch.setattr(Engine, "load", _no_load)
    assert main(["--port", "0", "--device", device]) == 2
    err = capsys.readouterr().err
    assert f"--device {device}" in err.replace("'", "") and "Traceback" not in err


def test_a_thread_count_below_one_is_refused_by_the_parser(capsys, monkeypatch):
    from engine.runtime import Engine
    monkeypatch.setattr(Engine, "load", _no_load)
    with pytest.raises(SystemExit) as e:
        main(["--threads", "0"])
    assert e.value.code == 2 and "--threads: must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--max-upload-mb", "1e400", "must be a finite number > 0"),  # an OverflowError traceback
    ("--max-message-mb", "nan", "must be a finite number > 0"),  # "cannot convert float NaN to integer"
    ("--max-audio-seconds", "inf", "must be a finite number > 0"),  # started, with no audio limit at all
    ("--max-request-mb", "-5", "must be a finite number > 0"),  # "Limits.max_request_bytes ... -5242880"
    ("--max-queue", "0", "must be at least 1"), ("--max-image-pixels", "many", "must be a whole number"),
    ("--realtime-idle-seconds", "0", "must be a finite number > 0"),  # (a session closed at once)
    ("--dtype", "fp64", "invalid choice"),  # refused after the model load had started
    ("--log-level", "verbose", "invalid choice"),  # uvicorn's KeyError traceback after the load
])
def test_limits_and_dtype_the_server_cannot_use_are_refused_by_the_parser_naming_the_flag(capsys, monkeypatch, flag,
                                                                                          value, message):
    from engine.runtime import Engine
    monkeypatch.setattr(Engine, "load", _no_load)
    with pytest.raises(SystemExit) as e:
        main([flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: {message}" in err and "Traceback" not in err
