"""A self-signed certificate for 127.0.0.1, made with the openssl command (the test skips without it): an engine's
TLS proxy that this machine was not told to trust."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest


def self_signed_context(folder: Path) -> tuple[ssl.SSLContext, Path]:
    """(a server-side TLS context with a fresh self-signed certificate for 127.0.0.1, that certificate's file)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a certificate with")
    cert, key = folder / "engine-cert.pem", folder / "engine-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context, cert
