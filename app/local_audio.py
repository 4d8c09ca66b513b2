"""Push-to-talk with this machine's own microphone and speaker (`launch.py --local-audio`), for a
kiosk: press Enter to talk, Enter again to send; the reply is printed as it streams and spoken
through the speaker when the engine has speech output.

It drives the engine through the realtime protocol (`/v1/realtime`, push-to-talk: the client
commits each turn), exactly as the Live tab does, so it works with a local or a remote engine.
The microphone is read at its own rate and sent with that `sample_rate` (the engine resamples).
sounddevice (PortAudio, Debian's libportaudio2) is imported only here, and only when used; with no
audio device the problem is said plainly and nothing starts.

    from app.local_audio import check_local_audio, run_local_audio
    problem = check_local_audio()          # None, or a message to print before exiting
    run_local_audio("ws://127.0.0.1:8000", token)
"""

from __future__ import annotations

import base64
import json
import queue
import sys
import threading
from typing import Callable, Iterable

import numpy as np

CHUNK_SECONDS = 0.05
MIN_TURN_SECONDS = 0.2


class LocalAudioUnavailable(RuntimeError):
    """No usable microphone or speaker on this machine (the message says what is missing)."""


def load_sounddevice():
    """The sounddevice module, or LocalAudioUnavailable saying what to install."""
    try:
        import sounddevice  # noqa: PLC0415  (optional, local-audio mode only)
    except ImportError:
        raise LocalAudioUnavailable("--local-audio needs the sounddevice package: pip install sounddevice==0.5.6") \
            from None
    except OSError as e:  # the package is there, the PortAudio library is not
        raise LocalAudioUnavailable(f"--local-audio needs the PortAudio library ({e}); on Debian/Ubuntu: "
                                    "apt-get install -y libportaudio2") from None
    return sounddevice


def audio_devices(sd) -> tuple[dict, dict | None]:
    """(default input device, default output device or None) as sounddevice describes them."""
    try:
        mic = sd.query_devices(kind="input")
    except Exception as e:  # PortAudioError when there is none, ValueError on some hosts
        raise LocalAudioUnavailable(
            "no microphone found: this machine has no audio input device (PortAudio: "
            f"{e}). --local-audio needs a microphone (and a speaker for spoken replies); in a browser, use the "
            "studio's Live tab instead.") from None
    if not mic or mic.get("max_input_channels", 0) < 1:
        raise LocalAudioUnavailable("no microphone found: the default audio device has no input channels")
    try:
        speaker = sd.query_devices(kind="output")
    except Exception:
        speaker = None
    return mic, speaker if speaker and speaker.get("max_output_channels", 0) >= 1 else None


def check_local_audio(sd=None) -> str | None:
    """None when a microphone can be used, otherwise the message to show."""
    try:
        audio_devices(sd or load_sounddevice())
    except LocalAudioUnavailable as e:
        return str(e)
    return None


class LocalAudioSession:
    """One realtime session driven by the keyboard, the microphone and the speaker."""

    def __init__(self, engine_url: str, token: str | None, *, sd=None, out: Callable[[str], None] | None = None,
                 speech_output: bool = False):
        from app.live_proxy import realtime_url  # noqa: PLC0415

        self.sd = sd or load_sounddevice()
        self.mic, self.speaker = audio_devices(self.sd)
        self.url = realtime_url(engine_url)
        self.token = token
        self.out = out or (lambda text: print(text, end="", flush=True))
        self.speech_output = speech_output and self.speaker is not None
        self.rate = int(self.mic.get("default_samplerate") or 16000)
        self.ws = None
        self.chunks: queue.Queue = queue.Queue()
        self.reply_done = threading.Event()
        self.failed: str | None = None

    # ------------------------------------------------------------------ connection
    def connect(self) -> None:
        from websockets.sync.client import connect  # noqa: PLC0415

        from engine.client.core import connect_error, without_redirects  # noqa: PLC0415

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:  # a redirect is said with where it points, not followed (as engine.client does); closed in close()
            self.ws = without_redirects(connect(self.url, additional_headers=headers, open_timeout=10,
                                                max_size=2 ** 25, legacy=False)).connect().__enter__()
        except Exception as e:
            raise LocalAudioUnavailable(f"cannot open a realtime session at {self.url}: "
                                        f"{connect_error(self.url, e).message}") from None
        self.send({"type": "session.update", "session": {  # push-to-talk: this client commits each turn
            "type": "realtime", "output_modalities": ["audio"] if self.speech_output else ["text"],
            "audio": {"input": {"turn_detection": None}}}})
        threading.Thread(target=self._receive, name="local-audio-receive", daemon=True).start()

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()

    def send(self, event: dict) -> None:
        self.ws.send(json.dumps(event))

    def _receive(self) -> None:
        player = None
        try:
            for text in self.ws:
                ev = json.loads(text)
                kind = ev.get("type")
                if kind in ("response.output_text.delta", "response.output_audio_transcript.delta"):
                    self.out(ev.get("delta", ""))
                elif kind == "response.output_audio.delta" and self.speech_output:
                    pcm = np.frombuffer(base64.b64decode(ev["delta"]), dtype="<i2")
                    rate = int(ev.get("sample_rate") or 24000)
                    if player is None or player.samplerate != rate:
                        if player is not None:
                            player.close()
                        player = self.sd.OutputStream(samplerate=rate, channels=1, dtype="int16")
                        player.start()
                    player.write(pcm.reshape(-1, 1))
                elif kind == "response.done":
                    status = (ev.get("response") or {}).get("status")
                    if status == "failed":
                        err = ((ev["response"].get("status_details") or {}).get("error") or {})
                        self.out(f"\n[the reply failed: {err.get('message', 'unknown error')}]")
                    self.out("\n")
                    self.reply_done.set()
                elif kind == "error":
                    err = ev.get("error") or {}
                    self.out(f"\n[error: {err.get('message', err)}]\n")
                    if err.get("code") in ("conversation_empty", "input_audio_buffer_commit_empty"):
                        self.reply_done.set()
        except Exception as e:  # the connection dropped
            self.failed = f"the connection to the engine was lost ({type(e).__name__})"
        finally:
            if player is not None:
                player.close()
            self.reply_done.set()

    # ------------------------------------------------------------------ one turn
    def record_until(self, stop: threading.Event) -> float:
        """Stream the microphone to the engine until `stop` is set; returns the seconds sent."""
        blocksize = int(self.rate * CHUNK_SECONDS)

        def on_audio(indata, frames, time_info, status) -> None:
            self.chunks.put(np.array(indata[:, 0], dtype=np.int16))

        sent = 0
        self.send({"type": "input_audio_buffer.clear"})
        with self.sd.InputStream(samplerate=self.rate, channels=1, dtype="int16", blocksize=blocksize,
                                 callback=on_audio):
            while not stop.is_set() or not self.chunks.empty():
                try:
                    chunk = self.chunks.get(timeout=0.1)
                except queue.Empty:
                    continue
                self.send({"type": "input_audio_buffer.append", "sample_rate": self.rate,
                           "audio": base64.b64encode(chunk.astype("<i2").tobytes()).decode("ascii")})
                sent += len(chunk)
        return sent / self.rate

    def turn(self, wait_for_enter: Callable[[], object]) -> None:
        stop = threading.Event()
        recorder = threading.Thread(target=lambda: setattr(self, "_seconds", self.record_until(stop)), daemon=True)
        self._seconds = 0.0
        recorder.start()
        wait_for_enter()
        stop.set()
        recorder.join()
        if self._seconds < MIN_TURN_SECONDS:
            self.out(f"(too short: {self._seconds:.1f} s; press Enter, speak, then press Enter)\n")
            return
        self.reply_done.clear()
        self.send({"type": "input_audio_buffer.commit"})
        self.send({"type": "response.create"})
        self.out("Ming: ")
        self.reply_done.wait()


def run_local_audio(engine_url: str, engine_token: str | None = None, *, lines: Iterable[str] | None = None,
                    out: Callable[[str], None] | None = None, sd=None, speech_output: bool = False) -> int:
    """Push-to-talk until end of input (Ctrl+D) or Ctrl+C. Returns an exit code: 0, or 1 when the
    audio devices or the engine cannot be used (the reason is printed)."""
    say = out or (lambda text: print(text, end="", flush=True))
    keys = iter(lines) if lines is not None else iter(sys.stdin.readline, "")
    try:
        session = LocalAudioSession(engine_url, engine_token, sd=sd, out=say, speech_output=speech_output)
        session.connect()
    except LocalAudioUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    say(f"Local audio: microphone '{session.mic.get('name', '?')}' at {session.rate} Hz"
        + (f", speaker '{session.speaker.get('name', '?')}'" if session.speech_output else ", replies as text")
        + ".\nPress Enter to talk, Enter again to send; Ctrl+D to quit.\n")
    try:
        for _ in keys:
            if session.failed:
                break
            say("Listening... (Enter to send)\n")
            session.turn(lambda: next(keys, None))
            if session.failed:
                break
    except KeyboardInterrupt:
        pass
    finally:
        session.close()
    if session.failed:
        print(f"error: {session.failed}", file=sys.stderr)
        return 1
    return 0
