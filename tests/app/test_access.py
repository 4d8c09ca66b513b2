"""Who may open the studio: loopback is open; the network or a share link needs a login unless the
operator opts out explicitly, and refusing says why."""

from __future__ import annotations

import pytest

from app.access import AccessRefused, check_access, read_credentials


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.5"])
def test_loopback_without_login_is_open(host):
    assert check_access(host, share=False, credentials=[], insecure_no_auth=False) is None


@pytest.mark.parametrize("host,share,needle", [("0.0.0.0", False, "--host 0.0.0.0"), ("127.0.0.1", True, "--share"),
                                               ("192.0.2.7", True, "--share")])
def test_exposed_without_login_is_refused_with_the_reason(host, share, needle):
    with pytest.raises(AccessRefused) as e:
        check_access(host, share=share, credentials=[], insecure_no_auth=False)
    msg = str(e.value)
    assert needle in msg and "--auth" in msg and "--insecure-no-auth" in msg


def test_a_login_or_an_explicit_opt_out_lets_it_start():
    assert check_access("0.0.0.0", True, [("alice", "pw")], insecure_no_auth=False) is None
    warning = check_access("0.0.0.0", False, [], insecure_no_auth=True)
    assert warning and "NO login" in warning


def test_credentials_from_flags_and_file(tmp_path):
    f = tmp_path / "users.txt"
    f.write_text("# studio users\nbob:s3cr:et\n\n  carol:pw  \n", encoding="utf-8")
    assert read_credentials(["alice:x"], f) == [("alice", "x"), ("bob", "s3cr:et"), ("carol", "pw")]


@pytest.mark.parametrize("bad", ["alice", ":pw", "alice:"])
def test_malformed_credentials_are_named(bad, tmp_path):
    with pytest.raises(AccessRefused, match="user:password"):
        read_credentials([bad], None)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nobody\n")
    with pytest.raises(AccessRefused, match="no 'user:password'"):
        read_credentials(None, empty)
    with pytest.raises(AccessRefused, match="cannot read"):
        read_credentials(None, tmp_path / "missing.txt")


@pytest.mark.parametrize("bad", ["alice;wonderland", ":wonderland", "alice:"])
def test_a_malformed_login_is_refused_without_repeating_its_password(bad, tmp_path):
    """STUDIO_AUTH (a Space's secret) or --auth-file with a wrong separator: the refusal printed the value, password
    and all, into the log."""
    with pytest.raises(AccessRefused) as e:
        read_credentials([bad], None, "STUDIO_AUTH")
    assert str(e.value).startswith("STUDIO_AUTH:") and "wonderland" not in str(e.value)
    f = tmp_path / "users.txt"
    f.write_text(f"carol:pw\n{bad}\n", encoding="utf-8")
    with pytest.raises(AccessRefused) as e:
        read_credentials(None, f)
    assert "line 2" in str(e.value) and "wonderland" not in str(e.value)
