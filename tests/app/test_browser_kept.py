"""What a tab keeps in the browser (app.ui.common.browser_kept) can still be read after the studio restarts."""
import stat

import pytest

from app.ui import common


@pytest.fixture
def fresh_start(monkeypatch, tmp_path):
    """A studio start with its cache in tmp_path: call it again to start once more (the module's key forgotten)."""
    monkeypatch.setenv("MING_STUDIO_CACHE", str(tmp_path))

    def start():
        monkeypatch.setattr(common, "_browser_secret", None)
        return common.browser_kept("ming-studio-test-request")
    return start


def test_the_key_is_the_same_after_a_restart_and_only_its_owner_reads_it(fresh_start, tmp_path):
    first, second = fresh_start(), fresh_start()
    assert first.secret == second.secret and len(first.secret) >= 24
    assert first.storage_key == "ming-studio-test-request"
    mode = stat.S_IMODE((tmp_path / common.BROWSER_SECRET_FILE).stat().st_mode)
    assert mode == 0o600


def test_each_install_has_its_own_key(monkeypatch, tmp_path):
    keys = []
    for folder in ("a", "b"):
        monkeypatch.setenv("MING_STUDIO_CACHE", str(tmp_path / folder))
        monkeypatch.setattr(common, "_browser_secret", None)
        keys.append(common.browser_secret())
    assert keys[0] != keys[1]


def test_a_cache_that_cannot_be_written_still_gives_a_key_and_says_so(monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MING_STUDIO_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(common, "_browser_secret", None)
    assert common.browser_kept("k").secret
    assert "will not be read back after a restart" in capsys.readouterr().err
