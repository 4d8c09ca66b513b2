"""`python -m engine.tts`: writes a WAV whose header states the true rate, prints the figures."""

import wave

import pytest

from engine.tts import _music, main
from tests.cli_checks import check_unloadable_checkpoint


def test_cli_writes_wav_and_prints_figures(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out.wav"
    assert main(["--model", str(tiny_checkpoint), "--text", "Hello from the command line.", "--seed", "1",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "first chunk after" in printed and "real-time factor" in printed
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (44100, 1, 2) and w.getnframes() > 0
    # an instruction the model does not know is the user's input refused (it exited 1, a failed generation's code)
    assert main(["--model", str(tiny_checkpoint), "--text", "hi", "--instruct", "dialect=klingon",
                 "--out", str(tmp_path / "x.wav")]) == 2
    assert "cantonese" in capsys.readouterr().err and not (tmp_path / "x.wav").exists()  # not an empty WAV


def test_a_run_refused_after_the_load_leaves_an_existing_out_file_as_it_was(tiny_checkpoint, tmp_path, capsys):
    """The WAV was opened (truncated, then deleted) before the speech started: a request refused then destroyed
    the file the user already had at that path. It is written beside it and renamed once it has sound."""
    out = tmp_path / "keep.wav"
    out.write_bytes(b"the user's earlier recording")
    assert main(["--model", str(tiny_checkpoint), "--text", "hi", "--instruct", "dialect=klingon",
                 "--out", str(out)]) == 2
    assert out.read_bytes() == b"the user's earlier recording"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.wav"]
    capsys.readouterr()
    assert main(["--model", str(tiny_checkpoint), "--text", "Hello.", "--seed", "1", "--out", str(out)]) == 0
    with wave.open(str(out)) as w:
        assert w.getnframes() > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.wav"]


def test_listing_no_saved_voices_says_so(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MING_STUDIO_CACHE", str(tmp_path))
    assert main(["--model", str(tiny_checkpoint), "--list-voices"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "no saved voices" in captured.err


def test_cli_music_duration_as_written_in_the_prompt_or_refused_before_loading(capsys):
    """'--music duration=30s' (the music prompt's own 'Duration: 30s.') is 30 seconds; a duration that is no
    number ends with a usage error naming it (status 2), not a traceback after the model has loaded."""
    assert _music("genre=jazz, duration=30s") == {"genre": "jazz", "duration": 30.0}
    assert _music("duration=12.5")["duration"] == 12.5
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "/nonexistent/never/loaded", "--task", "music", "--music", "genre=jazz,duration=soon",
              "--out", "x.wav"])
    assert exit_info.value.code == 2 and "duration" in capsys.readouterr().err


def test_cli_names_a_checkpoint_it_cannot_load(tmp_path, capsys):
    out = tmp_path / "out.wav"
    check_unloadable_checkpoint(main, tmp_path, capsys, ["--text", "hi", "--out", str(out)], 2, out)


@pytest.mark.parametrize("out", ["a_folder", "missing/out.wav"])
def test_an_out_path_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, capsys, out):
    """--out naming a folder or a file in a folder that does not exist was an IsADirectoryError / FileNotFoundError
    traceback after the model had loaded (here --model names no checkpoint: the refusal comes first)."""
    (tmp_path / "a_folder").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "never_loaded"), "--text", "hi", "--out", str(tmp_path / out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--out {tmp_path / out}: " in err
    assert ("is a folder" if out == "a_folder" else "does not exist") in err


def test_an_unknown_voice_is_refused_with_the_input_exit_code(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """--delete-voice of a voice that was never saved is the user's input refused: exit 2 and one line (it was 1,
    the code of a generation that failed)."""
    monkeypatch.setenv("MING_STUDIO_CACHE", str(tmp_path))  # an empty voice library
    assert main(["--model", str(tiny_checkpoint), "--delete-voice", "never-saved"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "never-saved" in err and "Traceback" not in err


@pytest.mark.parametrize("flags, says", [([], "--out is required"),
                                         (["--voice", "x", "--ref", "a.wav", "--out", "x.wav"], "exclude each other"),
                                         (["--save-voice", "x"], "--save-voice needs one --ref clip")])
def test_flags_that_cannot_work_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, flags, says):
    """A missing --out, --voice with --ref, or --save-voice without a clip were said after the model had loaded
    (minutes for the real one); they are usage errors first (the --model here would not load)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "never_loaded"), "--text", "hi", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err and "could not load" not in err, err


def test_help_offers_only_dtypes_that_can_be_given(capsys):
    """--help listed '--dtype {None,fp32,bf16,fp16}', and '--dtype None' is refused: None is no choice."""
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--dtype {fp32,bf16,fp16}" in capsys.readouterr().out


def test_text_dash_is_read_from_stdin(tmp_path, capsys, monkeypatch):
    """'--text -' spoke the one character '-'; it is stdin's text, and bytes that are not UTF-8 are a usage error
    before the model loads."""
    import io

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe")))
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "never_loaded"), "--text", "-", "--out", str(tmp_path / "x.wav")])
    assert e.value.code == 2 and "--text -: stdin is not UTF-8 text" in capsys.readouterr().err


def test_a_clipped_reference_clip_is_cloned_with_a_warning(tiny_checkpoint, tmp_path, capsys):
    """A clip recorded too loud was cloned without a word; the CLI now warns, saying how much of it sits at full scale
    and what to do, and still makes the speech."""
    import numpy as np

    ref, out = tmp_path / "loud.wav", tmp_path / "out.wav"
    t = np.arange(16000) / 16000
    with wave.open(str(ref), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(1.5 * np.sin(2 * np.pi * 220 * t), -1, 1) * 32767).astype("<i2").tobytes())
    assert main(["--model", str(tiny_checkpoint), "--text", "Hi.", "--ref", str(ref), "--ref-text", "hello",
                 "--max-seconds", "0.3", "--seed", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    # (1 - 2 asin(1 / 1.5) / pi of a tone 1.5 times full scale)
    assert "warning: reference clip is clipped: 53.8% of its samples sit at full scale" in err, err
    assert out.stat().st_size > 44
