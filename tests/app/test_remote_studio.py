"""launch.py as a UI-only studio against an engine server in another process: the page streams a
chat in a real browser, the UI process never loads torch, an engine that is down is shown plainly
and the page recovers when it comes back; and the access rules of --host / --share / --auth."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.app.browser import keep_screenshot
from tests.paths import REPO

LAUNCH = REPO / "launch.py"
TOKEN = "remote-test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ENGINE_URL", "ENGINE_TOKEN", "SPACE_ID", "STUDIO_AUTH")}
    env.update(MING_STUDIO_CACHE=str(cache), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


class Proc:
    """A child process whose output is collected; `wait_for(pattern)` waits for a line."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 90) -> re.Match | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.output)
            if m or self.proc.poll() is not None:
                return m
            time.sleep(0.05)
        return None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=5)


def start_engine(cache: Path, port: int) -> Proc:
    p = Proc([sys.executable, "-m", "engine.server", "--port", str(port), "--token", TOKEN, "--threads", "1",
              "--log-level", "warning"], env_for(cache))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return p
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    p.stop()
    raise AssertionError(f"the engine server did not start:\n{p.output}")


def start_ui(cache: Path, engine_port: int, extra: list[str] = ()) -> tuple[Proc, str]:
    port = free_port()
    p = Proc([sys.executable, str(LAUNCH), "--engine", f"ws://127.0.0.1:{engine_port}", "--engine-token", TOKEN,
              "--port", str(port), *extra], env_for(cache))
    assert p.wait_for(r"running at (\S+)"), p.output
    return p, f"http://127.0.0.1:{port}/"


def process_memory(pid: int) -> tuple[float, bool]:
    """(resident MiB, whether libtorch is mapped) of a process, from /proc."""
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:")) / 1024
    return rss, "libtorch" in Path(f"/proc/{pid}/maps").read_text()


@pytest.fixture(scope="module")
def cache(tiny_checkpoint) -> Path:
    return tiny_checkpoint.parent


def test_ui_only_studio_streams_a_chat_in_a_browser_without_torch(cache, new_context):
    from playwright import sync_api
    engine_port = free_port()
    engine = start_engine(cache, engine_port)
    ui = None
    try:
        ui, url = start_ui(cache, engine_port)
        assert "Engine at ws://127.0.0.1" in ui.output and "RANDOM DEMO WEIGHTS" in ui.output
        page = new_context(viewport={"width": 1280, "height": 1000}).new_page()
        page.goto(url, wait_until="load", timeout=60_000)
        sync_api.expect(page.locator("#model-banner")).to_contain_text("RANDOM DEMO WEIGHTS", timeout=30_000)
        box = page.locator("#chat-input textarea")
        box.fill("Hello over the wire")
        box.press("Enter")
        sync_api.expect(page.locator("#chat-figures")).to_contain_text("finish reason", timeout=60_000)
        bot = page.locator("#chat-history [data-testid='bot']")
        assert bot.count() >= 1 and bot.last.inner_text().strip()
        keep_screenshot(page, "remote-studio-chat-desktop")
        page.context.close()  # (the page leaves before the studio stops)
        rss, torch_loaded = process_memory(ui.proc.pid)
        print(f"\nUI-only studio process: {rss:.0f} MiB resident, libtorch mapped: {torch_loaded}")
        assert not torch_loaded, "the UI-only studio loaded torch"
    finally:
        if ui is not None:
            ui.stop()
        engine.stop()


def test_an_engine_that_is_down_is_shown_and_the_page_recovers(cache):
    engine_port = free_port()
    ui, url = start_ui(cache, engine_port)  # nothing listens there yet
    engine = None
    try:
        assert "is not answering" in ui.output and "starts anyway" in ui.output
        from gradio_client import Client

        client = Client(url, verbose=False)
        history, box, figures, _ = client.predict([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                                  4, 0.0, 1.0, 0, 1.0, None, "", False, False, "", api_name="/chat")
        assert history == [] and box["text"] == "hi" and figures.startswith("Error (connect_failed)")
        engine = start_engine(cache, engine_port)
        deadline = time.monotonic() + 60
        while True:  # the page re-asks the engine every few seconds
            history, _, figures, _ = client.predict([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                                    4, 0.0, 1.0, 0, 1.0, None, "", False, False, "", api_name="/chat")
            if "finish reason" in figures or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert "finish reason" in figures and len(history) == 2
    finally:
        ui.stop()
        if engine is not None:
            engine.stop()


@pytest.mark.parametrize("args,needle", [(["--host", "0.0.0.0"], "--host 0.0.0.0"), (["--share"], "--share")])
def test_exposed_studio_without_a_login_is_refused(tmp_path, args, needle):
    r = subprocess.run([sys.executable, str(LAUNCH), "--engine", "ws://127.0.0.1:9", *args], cwd=REPO,
                       env=env_for(tmp_path), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert needle in r.stderr and "--auth" in r.stderr and "--insecure-no-auth" in r.stderr


def test_with_auth_a_login_is_required(cache):
    engine_port = free_port()
    ui, url = start_ui(cache, engine_port, ["--auth", "alice:wonderland"])
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "config", timeout=10)
        assert e.value.code in (401, 403)
        import httpx

        with httpx.Client(base_url=url, timeout=10) as http:
            assert http.post("login", data={"username": "alice", "password": "wrong"}).status_code in (400, 401)
            assert http.post("login", data={"username": "alice", "password": "wonderland"}).status_code == 200
            config = http.get("config")
            assert config.status_code == 200
            page = http.get("")
        assert TOKEN not in config.text and TOKEN not in page.text  # the engine's token stays on the studio's server
    finally:
        ui.stop()
    assert TOKEN not in ui.output and "wonderland" not in ui.output  # nor in its log (the engine was down: warned)


def test_studio_drives_an_openai_compatible_engine(cache):
    """--engine openai+http://...: the studio talks only OpenAI's routes (here our own server in
    --openai-only mode, as vLLM-Omni or SGLang-Omni would serve them); Live says it cannot work."""
    engine_port = free_port()
    engine = Proc([sys.executable, "-m", "engine.server", "--port", str(engine_port), "--token", TOKEN, "--threads",
                   "1", "--log-level", "warning", "--openai-only"], env_for(cache))
    ui = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and engine.proc.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{engine_port}/health", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        port = free_port()
        ui = Proc([sys.executable, str(LAUNCH), "--engine", f"openai+http://127.0.0.1:{engine_port}",
                   "--engine-token", TOKEN, "--port", str(port)], env_for(cache))
        assert ui.wait_for(r"running at (\S+)"), ui.output
        from gradio_client import Client

        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        history, _, figures, _ = client.predict([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                                4, 0.0, 1.0, 0, 1.0, None, "", False, False, "", api_name="/chat")
        assert "finish reason" in figures and len(history) == 2, figures
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=10) as resp:
            assert "realtime protocol" in resp.read().decode()
    finally:
        if ui is not None:
            ui.stop()
        engine.stop()
