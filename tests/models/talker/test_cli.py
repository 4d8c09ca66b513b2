"""`python -m engine.tts`: writes a WAV whose header states the true rate, prints the figures."""

import wave

from engine.tts import main


def test_cli_writes_wav_and_prints_figures(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out.wav"
    assert main(["--model", str(tiny_checkpoint), "--text", "Hello from the command line.", "--seed", "1",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "first chunk after" in printed and "real-time factor" in printed
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (44100, 1, 2) and w.getnframes() > 0
    assert main(["--model", str(tiny_checkpoint), "--text", "hi", "--instruct", "dialect=klingon",
                 "--out", str(tmp_path / "x.wav")]) == 1
    assert "cantonese" in capsys.readouterr().err
