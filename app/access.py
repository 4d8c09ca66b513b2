"""Who may open the studio: a studio on a loopback address is open to this machine; one reachable
from the network (any other `--host`) or through a public `--share` link needs a login (`--auth
user:pass`, repeatable, or `--auth-file` with one `user:pass` per line), unless the operator says
`--insecure-no-auth` explicitly. Refusing says why and what to do."""

from __future__ import annotations

from pathlib import Path

from engine.client import is_loopback_host


class AccessRefused(RuntimeError):
    """The studio will not start with these settings; the message explains why and what to do."""


def parse_credential(text: str, where: str) -> tuple[str, str]:
    """(user, password) from 'user:password'. Refused without repeating the text: it holds a password (a Space's
    STUDIO_AUTH secret 'alice;wonderland' went into the log whole)."""
    user, sep, password = text.partition(":")
    if not sep or not user.strip() or not password:
        what = "no ':'" if not sep else "no user name before the ':'" if not user.strip() else "no password after the ':'"
        raise AccessRefused(f"{where}: expected 'user:password' (a user name, ':', then the password); it has {what} "
                            "(the value is not repeated here)")
    return user.strip(), password


def read_credentials(auth: list[str] | None, auth_file: str | Path | None,
                     auth_source: str = "--auth") -> list[tuple[str, str]]:
    """(user, password) pairs from `--auth user:pass` (repeatable; `auth_source`: where they came from, e.g. the
    STUDIO_AUTH variable) and `--auth-file` (one per line; blank lines and lines starting with # are skipped)."""
    creds = [parse_credential(a, auth_source) for a in auth or []]
    if auth_file is not None:
        path = Path(auth_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise AccessRefused(f"--auth-file {path}: cannot read it ({e})") from None
        for n, line in enumerate(lines, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                creds.append(parse_credential(line.strip(), f"--auth-file {path}, line {n}"))
        if not creds:
            raise AccessRefused(f"--auth-file {path} holds no 'user:password' line")
    return creds


def check_access(host: str, share: bool, credentials: list[tuple[str, str]], insecure_no_auth: bool) -> str | None:
    """Raise AccessRefused when the studio would be reachable by others without a login. Returns a
    warning to print when the operator opted out with --insecure-no-auth (None otherwise)."""
    exposed = []
    if not is_loopback_host(host):
        exposed.append(f"--host {host} makes it reachable from the network")
    if share:
        exposed.append("--share publishes it on a public gradio.live link")
    if not exposed or credentials:
        return None
    what = " and ".join(exposed)
    if insecure_no_auth:
        return (f"WARNING: {what}, with NO login (--insecure-no-auth): anyone who finds the address can use the "
                "model and its compute.")
    raise AccessRefused(
        f"refusing to start: {what}, and no login is set, so anyone who finds the address could use the model "
        "(and this machine's compute). Add --auth user:password (repeatable) or --auth-file FILE (one "
        "user:password per line); or keep it on this machine with --host 127.0.0.1 and no --share; or, if you "
        "really mean it, pass --insecure-no-auth.")
