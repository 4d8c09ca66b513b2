"""launch.py as a user runs it: --help, clear failures (exit code 2, no traceback) for a model that
cannot be loaded, and a real start that serves the page."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from app.live_proxy import LIVE_WS_PATH
from tests.app.canned_http import answering, serving
from tests.server import handshake_answer

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch.py"


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(MING_STUDIO_CACHE=str(cache), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="session")
def studio_cache(tiny_checkpoint) -> Path:
    """The cache folder holding the tiny checkpoint (generated once per session by conftest)."""
    return tiny_checkpoint.parent


def _run(args: list[str], cache: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """launch.py with `args`, on a free port unless they name one (the default 7860 may be taken on this machine:
    the studio's address is checked before the model loads)."""
    port = [] if "--port" in args or "--help" in args else ["--port", str(_free_port())]
    return subprocess.run([sys.executable, str(LAUNCH), *args, *port], cwd=REPO, env=_env(cache),
                          capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_help_documents_every_flag(tmp_path):
    r = _run(["--help"], tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    for flag in ("--model", "--engine", "--engine-token", "--host", "--port", "--share", "--auth", "--auth-file",
                 "--insecure-no-auth", "--dtype", "--device", "--expert-dtype", "--linear-dtype"):
        assert flag in r.stdout
    assert "inclusionAI/Ming-flash-omni-2.0" in r.stdout
    assert "127.0.0.1" in r.stdout and "7860" in r.stdout  # the defaults are stated


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "corrupt_config", "file"])
def test_unloadable_model_exits_2_with_a_clear_message(tmp_path, studio_cache, kind):
    target = tmp_path / "ckpt"
    if kind == "empty_dir":
        target.mkdir()
    elif kind == "corrupt_config":
        target.mkdir()
        (target / "config.json").write_text("{ this is not json")
    elif kind == "file":
        target.write_text("not a checkpoint")
    r = _run(["--model", str(target), "--port", str(_free_port())], studio_cache)  # (7860 may be taken here)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert "error: could not load the model" in r.stderr
    assert str(target) in r.stderr


def test_a_cache_that_is_a_file_exits_2_saying_what_to_set(tmp_path):
    """MING_STUDIO_CACHE naming a file: the ffmpeg tools placed there at import were a NotADirectoryError traceback;
    now the tiny checkpoint's error says which folder and what to set."""
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file")
    r = _run([], not_a_folder)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert f"cannot write the tiny demo checkpoint into {not_a_folder}" in r.stderr and "MING_STUDIO_CACHE" in r.stderr


def test_unusable_device_exits_2(tmp_path):
    r = _run(["--device", "not-a-device", "--port", str(_free_port())], tmp_path, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "--device not-a-device" in r.stderr.replace("'", "")


def test_bad_dtype_is_rejected_by_the_parser(tmp_path):
    r = _run(["--dtype", "int3"], tmp_path, timeout=60)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_default_launch_serves_the_demo_studio(studio_cache):
    """No --model: the tiny demo loads, the URL and load time are printed, the page answers 200. Started with a proxy in
    the environment and no NO_PROXY (a company machine; this one cannot reach our loopback), as it died there in
    Gradio's start-up check with an httpx.ConnectError traceback, and its requests to its own engine went to the proxy:
    loopback is reached directly (keep_loopback_off_proxies)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {name: value for name, value in _env(studio_cache).items() if name.lower() != "no_proxy"}
    env.update(HTTP_PROXY=DEAD_PROXY, HTTPS_PROXY=DEAD_PROXY, http_proxy=DEAD_PROXY, https_proxy=DEAD_PROXY)
    proc = subprocess.Popen([sys.executable, str(LAUNCH), "--port", str(port)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read_output():
        for line in proc.stdout:
            lines.append(line)
            if "running at" in line:
                ready.set()

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    status, banner = None, []
    try:
        ready.wait(timeout=90)  # the URL line is printed once the server is up
        if ready.is_set():
            with urllib.request.urlopen(url, timeout=10) as resp:
                status = resp.status
            with urllib.request.urlopen(url + "config", timeout=10) as resp:
                config = json.load(resp)
            banner = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "model-banner"]
            # the Live relay's websocket: an oversized handshake is answered (uvicorn's protocol left it hanging)
            long_handshake = handshake_answer(port, f"{LIVE_WS_PATH}?x={'a' * 9000}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
    out = "".join(lines)
    assert ready.is_set(), f"launch.py never printed its URL (exit code {proc.returncode}):\n{out}"
    assert f"running at {url}" in out, out
    assert status == 200
    # SIGTERM (the terminate above) closes the studio and the engine as Ctrl+C does: it died by the signal's default
    assert proc.returncode == 143 and out.rstrip().endswith("stopped (SIGTERM)") and "Traceback" not in out, out
    assert long_handshake.startswith(b"HTTP/1.1 414")
    assert banner and "RANDOM DEMO WEIGHTS" in banner[0]["props"]["value"]
    assert re.search(r"Loaded ming-tiny-random-v\d+ in \d+\.\d s", out), out
    assert "RANDOM DEMO WEIGHTS" in out
    # the command is a line of its own, the banner's (it had "(or a local checkpoint directory)" after it)
    from app.ui.banner import REAL_MODEL_COMMAND

    assert REAL_MODEL_COMMAND in [line.strip() for line in lines], out


DEAD_PROXY = "http://127.0.0.1:9"  # (nothing listens on the discard port: a proxy that reaches nothing)


@pytest.mark.parametrize("before, after", [
    ({"HTTPS_PROXY": DEAD_PROXY}, "localhost,127.0.0.1,::1"),
    ({"http_proxy": DEAD_PROXY, "NO_PROXY": "corp.example, localhost"}, "corp.example,localhost,127.0.0.1,::1"),
    ({"ALL_PROXY": DEAD_PROXY, "no_proxy": "*"}, None),  # (already: no proxy for anything)
    ({}, None)])  # (no proxy: nothing to keep off)
def test_loopback_is_kept_off_the_environments_proxy(before, after):
    from launch import keep_loopback_off_proxies

    environ = dict(before)
    keep_loopback_off_proxies(environ)
    if after is None:
        assert environ == before
    else:
        assert environ["NO_PROXY"] == environ["no_proxy"] == after


def test_local_audio_without_a_sound_device_says_so(tmp_path):
    """Kiosk mode on a machine without audio devices (or without PortAudio): one clear line, exit 2,
    before any model is loaded."""
    r = _run(["--local-audio"], tmp_path, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: --local-audio:") and "Loading" not in r.stdout


def test_closing_the_studio_sets_gradios_stop_event_on_the_servers_loop():
    """close_studio (launch.py's shutdown, the tests' teardown) sets Gradio's stop event on the loop its
    waiters run on, then closes: the event is set before demo.close() runs (Gradio's own set() from another
    thread raced with those waiters in CI), and the waiter wakes. With no loop bound (nothing ever waited)
    it simply closes."""
    import asyncio
    from types import SimpleNamespace

    pytest.importorskip("gradio")
    from app.studio import close_studio

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        async def make_and_wait():
            event = asyncio.Event()
            return event, asyncio.ensure_future(event.wait())

        event, waiter = asyncio.run_coroutine_threadsafe(make_and_wait(), loop).result(5)
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0.05), loop).result(5)  # the waiter binds the event's loop
        seen = []
        close_studio(SimpleNamespace(app=SimpleNamespace(stop_event=event), close=lambda: seen.append(event.is_set())))
        assert seen == [True]
        asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(waiter), 5), loop).result(6)
        assert waiter.done()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    unbound = asyncio.Event()
    seen = []
    close_studio(SimpleNamespace(app=SimpleNamespace(stop_event=unbound), close=lambda: seen.append(unbound.is_set())))
    assert seen == [False]  # nothing to do first: demo.close() sets it itself


def test_a_remote_engine_that_refuses_the_token_is_said_so_at_start(engine_server, capsys):
    """launch.py --engine URL --engine-token WRONG printed "the engine ... is not answering (unauthorized: ...)
    ... reconnects when the engine is back", which it never does with that token."""
    import argparse

    import launch

    launch._connect_remote_engine(argparse.Namespace(engine=engine_server.url, engine_token="wrong"))
    err = capsys.readouterr().err
    assert "refused the token" in err and "--engine-token" in err and "not answering" not in err, err
    # the token given in the URL (?token=, as the engine's websocket takes it) is used, and kept out of the log
    launch._connect_remote_engine(argparse.Namespace(engine=engine_server.url + "/?token=not-it-42", engine_token=None))
    said = capsys.readouterr()
    assert "refused the token" in said.err and "not-it-42" not in said.out + said.err, said


def test_a_studio_port_in_use_is_said_before_the_model_loads(studio_cache):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = _run(["--port", str(port)], studio_cache, timeout=60)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"--port {port}" in r.stderr and "in use" in r.stderr and "Traceback" not in r.stderr
    assert "Loading" not in r.stdout  # refused up front, not after the model load


@pytest.mark.parametrize("flags, says", [(["--port", "-1"], "--port -1: a port is 0 to 65535"),
                                         (["--port", "70000"], "--port 70000: a port is 0 to 65535"),
                                         (["--host", "no such host", "--auth", "a:b"], "not an address to listen on")])
def test_a_studio_address_that_is_no_address_is_a_refused_setting(capsys, flags, says):
    """--port -1 / 70000 or a --host that names nothing exited 1, the code --help gives a server that could not
    start (a port in use); they are settings refused: 2, before anything loads."""
    import launch

    assert launch.main(["--model", "/never/loaded", *flags]) == launch.EXIT_MODEL_ERROR
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err


def test_an_engine_url_that_is_not_one_exits_2_naming_it(tmp_path):
    r = _run(["--engine", "localhost:8000"], tmp_path, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "--engine" in r.stderr and "'localhost:8000'" in r.stderr and "Traceback" not in r.stderr


def test_ctrl_c_while_the_studio_starts_is_one_line_not_a_traceback(monkeypatch, capsys):
    """Ctrl+C pressed while the model loads (before the page is served) ended in a KeyboardInterrupt traceback and
    death by SIGINT; it is said in one line, exit code 130."""
    import launch

    def loading(argv=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "main", loading)
    assert launch.run([]) == launch.EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err.strip() == "stopped (Ctrl+C) while the studio was starting"


@pytest.mark.parametrize("argv, says", [
    (["--engine", "ws://h:1", "--dtype", "bf16", "--device=cuda"], ["--dtype, --device", "engine.server"]),
    (["--engine", "ws://h:1", "--expert-dtype", "int4"], ["--expert-dtype", "engine.server"]),
    (["--model", "/m"], ["ENGINE_URL (set in the environment)", "--model"])])
def test_flags_a_remote_engine_cannot_use_are_refused_naming_them(monkeypatch, capsys, argv, says):
    """--engine URL --dtype bf16 started the studio with the flag dropped without a word (the model loads on the
    engine server); a --model given where ENGINE_URL is set was refused as if --engine had been typed."""
    import launch

    monkeypatch.setenv("ENGINE_URL", "ws://gpu-box:8000")
    with pytest.raises(SystemExit) as stopped:
        launch.parse_args(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and all(s in err for s in says), err


def test_an_engine_url_secret_with_a_login_in_it_is_refused_naming_the_secret_not_repeating_it(monkeypatch, capsys):
    """A Space whose ENGINE_URL secret held a login (wss://alice:s3cret@gpu-box:8000) was refused as '--engine: ...',
    a flag its operator never typed; the refusal names ENGINE_URL, and still never repeats the password."""
    import launch

    monkeypatch.setenv("ENGINE_URL", "wss://alice:s3cret@gpu-box:8000")
    monkeypatch.delenv("ENGINE_TOKEN", raising=False)
    assert launch.main(["--port", "0"]) == launch.EXIT_MODEL_ERROR
    err = capsys.readouterr().err
    assert "ENGINE_URL" in err and "--engine:" not in err and "user name or password" in err, err
    assert "s3cret" not in err


def card_server(card: dict, port: int = 0):
    """The URL of a server answering every GET with a /v1/models list holding `card` (what a studio asks at start), on
    `port` (0: any free one)."""
    return serving(answering(200, {"object": "list", "data": [card]}), port)


@pytest.mark.parametrize("max_sessions", [None, 200])
def test_the_studio_launches_with_threads_for_as_many_streams_as_the_engine_has_sessions(monkeypatch, capsys,
                                                                                       max_sessions):
    """Gradio's 40 worker threads (its default) were held by ~45 slow streams (a 5 s/token engine), each waiting for
    its next event: every page action waited for a thread (0.25 -> 0.67 s). launch.py gives demo.launch threads for
    a stream per realtime session the engine holds and the page's own actions besides: 96 were sized for the default
    cap (64) even for an engine started with --max-sessions 200, whose 200 streams then blocked the page; the cap is
    now read from the engine's card. An engine not reached at start ran no stream but got 96 threads: it gets a few
    (the studio grows them when the card is read: the test below)."""
    import app.studio
    import launch
    from app.live_proxy import LiveProxy

    given = {}

    class Page:  # (the whole page takes seconds to build; launch_options needs only its Live relay and link)
        def __init__(self, link):
            self.link, self.live_proxy, self.extra_startup_events = link, LiveProxy(link.target), []

        def launch(self, **options):  # (the options are all this test needs: no server is started)
            given.update(options)
            raise OSError("not started in this test")

    monkeypatch.setattr(app.studio, "build_studio", Page)
    if max_sessions is None:
        no_engine = f"http://127.0.0.1:{_free_port()}"  # (the studio starts without its engine, saying so)
        code = launch.main(["--engine", no_engine, "--port", str(_free_port())])
    else:
        with card_server({"id": "m", "limits": {"max_sessions": max_sessions}}) as url:  # (as engine.server's card
            code = launch.main(["--engine", url, "--port", str(_free_port())])  # says it: tests/server/test_http_api)
    assert code != 0 and "not started in this test" in capsys.readouterr().err
    if max_sessions is None:
        assert given["max_threads"] < 40, given["max_threads"]
    else:
        assert given["max_threads"] >= max_sessions * 1.5 > 40, (given["max_threads"], max_sessions)


def test_a_studio_started_while_its_engine_is_down_grows_its_threads_when_the_engine_answers():
    """A studio whose engine was down at start sized its threads for the default 64 sessions (96) and kept them: an
    engine that then came up with --max-sessions 200 had its streams wait for threads. It starts with a few and, once
    a check reads the card, Gradio's thread limiter and its queue's job slots grow to what the card asks for."""
    import gradio as gr

    from app.engine_link import EngineLink
    from app.studio import WorkerThreads, close_studio, worker_threads
    from engine.client import EngineClient

    port = _free_port()
    with gr.Blocks() as demo:  # (a one-line page: the threads are the studio's, whatever the page)
        gr.Markdown("threads")
    demo.link = EngineLink(EngineClient(f"http://127.0.0.1:{port}", timeout=5), check_timeout_s=2)
    threads = WorkerThreads(demo)
    demo.launch(max_threads=threads.size, prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        few = worker_threads(None)
        assert demo.limiter.total_tokens == len(demo._queue.active_jobs) == few < 40
        with card_server({"id": "m", "limits": {"max_sessions": 200}}, port):
            assert demo.link.refresh(force=True).ok
        wanted = worker_threads(demo.link.info)
        deadline = time.monotonic() + 5
        while demo.limiter.total_tokens != wanted and time.monotonic() < deadline:
            time.sleep(0.02)  # (grown on the server's loop)
        assert demo.limiter.total_tokens == len(demo._queue.active_jobs) == wanted >= 300
    finally:
        close_studio(demo)


def test_max_sessions_is_given_to_the_local_engine_and_refused_with_a_remote_one(monkeypatch, capsys, tiny_engine):
    """`python launch.py` had no --max-sessions: its engine always held the server's default (64) realtime sessions.
    The flag goes to the engine served here (its card says it, so the studio sizes its threads by it); with --engine
    it is refused naming it, as the other flags of an engine run here."""
    import launch
    from engine.runtime import Engine

    monkeypatch.setattr(Engine, "load", lambda *args, **kwargs: tiny_engine)  # (the session's tiny engine: no reload)
    started = launch._start_local_engine(launch.parse_args(["--max-sessions", "3"]))
    assert not isinstance(started, int), capsys.readouterr().err
    link, handle = started
    try:
        assert link.info.max_sessions == 3
    finally:
        handle.stop()
    for refused, says in ((["--max-sessions", "0"], "at least 1"),
                          (["--engine", "ws://h:1", "--max-sessions", "3"], "--max-sessions")):
        with pytest.raises(SystemExit) as stopped:
            launch.parse_args(refused)
        assert stopped.value.code == 2 and says in capsys.readouterr().err
