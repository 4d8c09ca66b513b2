"""Local push-to-talk (app/local_audio.py): a plain message when the machine has no audio device
(this one has none), and a whole turn with a stand-in sound card against a fake engine."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from app.local_audio import LocalAudioUnavailable, audio_devices, check_local_audio, run_local_audio
from tests.app.fake_engine import REPLY, FakeEngine


def test_no_audio_device_is_said_plainly(capsys):
    problem = check_local_audio()
    if problem is None:
        pytest.skip("this machine has a microphone")
    # no sounddevice, no PortAudio library, or no device: each says what is missing and what to do
    assert any(s in problem for s in ("no microphone found", "apt-get install -y libportaudio2",
                                      "pip install sounddevice"))
    assert run_local_audio("ws://127.0.0.1:9", None, lines=[]) == 1
    assert problem in capsys.readouterr().err


class FakeSoundDevice:
    """sounddevice's surface that app.local_audio uses: a 48 kHz microphone playing a tone, a speaker."""

    class PortAudioError(Exception):
        pass

    def __init__(self, devices: bool = True):
        self.devices = devices
        self.played: list[tuple[int, int]] = []  # (sample rate, samples)
        sd = self

        class InputStream:
            def __init__(self, samplerate, channels, dtype, blocksize, callback):
                self.rate, self.block, self.callback = samplerate, blocksize, callback
                self.stop = threading.Event()

            def __enter__(self):
                def run():
                    n = 0
                    while not self.stop.is_set():
                        t = (n + np.arange(self.block)) / self.rate
                        self.callback((8000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)[:, None], self.block,
                                      None, None)
                        n += self.block
                        time.sleep(0.01)
                self.thread = threading.Thread(target=run, daemon=True)
                self.thread.start()
                return self

            def __exit__(self, *exc):
                self.stop.set()
                self.thread.join()

        class OutputStream:
            def __init__(self, samplerate, channels, dtype):
                self.samplerate = samplerate

            def start(self):
                pass

            def write(self, data):
                sd.played.append((self.samplerate, len(data)))

            def close(self):
                pass

        self.InputStream, self.OutputStream = InputStream, OutputStream

    def query_devices(self, kind=None):
        if not self.devices:
            raise self.PortAudioError("Error querying device -1")
        return {"name": f"fake {kind}", "max_input_channels": 1, "max_output_channels": 2,
                "default_samplerate": 48000.0}


def test_a_device_less_sound_card_is_refused_with_the_reason():
    with pytest.raises(LocalAudioUnavailable, match="no microphone found.*Error querying device -1"):
        audio_devices(FakeSoundDevice(devices=False))


def test_push_to_talk_turn_through_the_realtime_protocol():
    sd = FakeSoundDevice()
    printed: list[str] = []
    release = threading.Event()

    def keys():
        yield ""  # Enter: talk
        time.sleep(0.4)
        yield ""  # Enter: send
        release.wait(10)

    with FakeEngine(token="t0k", speak=True) as engine:
        lines = keys()
        done = threading.Thread(target=lambda: printed.append(run_local_audio(
            engine.url, "t0k", lines=lines, out=printed.append, sd=sd, speech_output=True)))
        done.start()
        deadline = time.monotonic() + 10
        while "".join(x for x in printed if isinstance(x, str)).count(REPLY) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        release.set()
        done.join(10)
        kinds = engine.got.types()
    text = "".join(x for x in printed if isinstance(x, str))
    assert printed[-1] == 0 and REPLY in text
    assert kinds[0] == "session.update" and engine.got.events[0]["session"]["audio"]["input"]["turn_detection"] is None
    assert kinds[-2:] == ["input_audio_buffer.commit", "response.create"]
    assert engine.got.audio_rates == {48000} and engine.got.audio_seconds >= 0.2
    assert engine.got.headers[0]["Authorization"] == "Bearer t0k"
    assert sd.played and {rate for rate, _ in sd.played} == {24000}  # the spoken reply reached the speaker


def test_an_engine_address_that_redirects_is_said_with_where_it_points_not_followed():
    """The kiosk's realtime socket followed a redirect (here to another path of the same host, round a loop: 'more than
    10 redirects'), where the studio's client never follows one. It is said with the address it points to."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from app.local_audio import LocalAudioSession

    class Moved(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802  (http.server's name)
            self.send_response(301)
            self.send_header("Location", "/ming" + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):  # (quiet)
            pass

    front = ThreadingHTTPServer(("127.0.0.1", 0), Moved)
    threading.Thread(target=front.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{front.server_address[1]}"
    try:
        with pytest.raises(LocalAudioUnavailable) as refused:
            LocalAudioSession(url, "t0k", sd=FakeSoundDevice()).connect()
    finally:
        front.shutdown()
        front.server_close()
    assert "redirects (HTTP 301)" in str(refused.value) and "/ming/v1/realtime" in str(refused.value), refused.value
