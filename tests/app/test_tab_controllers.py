"""The Voice and Image tabs' controllers against the tiny engine behind its server: saving a voice under a
name already taken keeps the saved voice and says how to replace it, ticking Replace replaces it; a seed box
left at -1 (or emptied by an API caller) draws a new seed each time."""

from __future__ import annotations

import pytest

pytest.importorskip("gradio")

from app.engine_link import EngineLink  # noqa: E402
from app.ui.common import RANDOM_SEED, chosen_seed  # noqa: E402
from app.ui.image import ImageController  # noqa: E402
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


def test_a_seed_left_at_random_draws_a_new_seed_each_time(engine_server):
    assert [chosen_seed(v) for v in (RANDOM_SEED, None, "", -7, 0, 42, 3.0)] == [None, None, None, None, 0, 42, 3]
    image = ImageController(EngineLink(EngineClient(engine_server.url, token="test-token")))
    seeds = []
    for seed in (RANDOM_SEED, RANDOM_SEED, RANDOM_SEED, 5):
        *_, last = image.make("Generate", "a cup", None, None, "", "1:1", "32x32", 2, 2.0, seed, 0, [],
                              progress=lambda *a, **k: None)
        seeds.append(last[5][-1]["settings"]["seed"])  # the gallery state's newest entry
    assert len(set(seeds[:3])) == 3 and seeds[3] == 5, seeds
