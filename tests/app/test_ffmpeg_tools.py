"""ffmpeg / ffprobe put on PATH at import when the machine lacks them: a cache they cannot be written into is a
warning, never an import error (every `import app` would fail)."""

import os

import pytest

from app import ffmpeg_tools


@pytest.mark.parametrize("cache", ["a_file", "under_a_file"])
def test_a_cache_that_cannot_be_written_is_a_warning_and_path_is_left_alone(tmp_path, monkeypatch, capsys, cache):
    pytest.importorskip("imageio_ffmpeg")
    pytest.importorskip("av")
    a_file = tmp_path / "cache"
    a_file.write_text("not a folder")
    monkeypatch.setenv("MING_STUDIO_CACHE", str(a_file if cache == "a_file" else a_file / "sub"))
    monkeypatch.setattr(ffmpeg_tools.shutil, "which", lambda name: None)  # a machine without ffmpeg
    path = os.environ.get("PATH", "")
    ffmpeg_tools.ensure_ffmpeg_tools()
    assert os.environ.get("PATH", "") == path
    err = capsys.readouterr().err
    assert "cannot put ffmpeg and ffprobe into" in err and "MING_STUDIO_CACHE" in err


def test_a_writable_cache_gets_the_tools_on_path(tmp_path, monkeypatch):
    pytest.importorskip("imageio_ffmpeg")
    pytest.importorskip("av")
    monkeypatch.setenv("MING_STUDIO_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", os.environ.get("PATH", ""))  # restored after the test
    monkeypatch.setattr(ffmpeg_tools.shutil, "which", lambda name: None)
    ffmpeg_tools.ensure_ffmpeg_tools()
    assert os.environ["PATH"].split(os.pathsep)[0] == str(tmp_path / "bin")
    assert os.access(tmp_path / "bin" / "ffprobe", os.X_OK) and (tmp_path / "bin" / "ffmpeg").exists()


@pytest.mark.parametrize("env", [{"MING_STUDIO_CACHE": "/srv/ming"}, {"XDG_CACHE_HOME": "/srv/xdg"}, {}])
def test_the_studio_finds_the_engines_cache_folder_without_importing_the_engine(monkeypatch, env):
    """app.ui.common found the cache (for the browser key) with engine.tiny, which imports torch: a UI-only studio (a
    Space, no torch) could not start. app.cache_dir names the same folder without the engine."""
    from app.cache_dir import studio_cache_dir
    from engine.tiny import default_cache_dir

    for name in ("MING_STUDIO_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert studio_cache_dir() == default_cache_dir()
