"""The Voice tab's voice library against the tiny engine behind its server: saving under a name
already taken keeps the saved voice and says how to replace it; ticking Replace replaces it."""

from __future__ import annotations

import pytest

pytest.importorskip("gradio")

from app.engine_link import EngineLink  # noqa: E402
from app.ui.voice import REPLACE_LABEL, VoiceController  # noqa: E402
from engine.client import EngineClient  # noqa: E402
from tests.server import tone_pcm16, wav_bytes  # noqa: E402


def test_saving_under_a_taken_name_keeps_the_voice_unless_replace_is_ticked(engine_server, tmp_path):
    voices = VoiceController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(tone_pcm16(1.5, 22050, 220.0), 22050))
    _, note = voices.save("studio voice", str(clip), "hello there")
    assert note.startswith("Saved the voice 'studio voice'") and "studio voice" in voices.voice_names()
    client = voices.link.client
    _, note = voices.save("studio voice", str(clip), "a second take")
    assert "already saved" in note and REPLACE_LABEL in note
    assert [v for v in client.voices() if v["name"] == "studio voice"][0]["reference_text"] == "hello there"
    _, note = voices.save("studio voice", str(clip), "a second take", True)
    assert note.startswith("Saved the voice 'studio voice'")
    assert [v for v in client.voices() if v["name"] == "studio voice"][0]["reference_text"] == "a second take"
    voices.delete("studio voice")
    _, note = voices.delete("studio voice")  # the server's error as it said it, once
    assert note == "Error (voice_not_found): unknown voice 'studio voice'"
