"""prefork.tls.build_context and key_password: what the master checks before it forks (no processes)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from prefork.errors import ConfigError
from prefork.tls import build_context, key_password
from tests.support import Certs


def encrypted_key(certs: Certs, tmp_path: Path, password: bytes) -> Path:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(certs.server[1].read_bytes(), password=None)
    path = tmp_path / "encrypted.key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(password)))
    return path


def test_a_good_pair_gives_a_server_context_with_the_settings(certs: Certs) -> None:
    context = build_context(str(certs.server[0]), str(certs.server[1]), ca_certs=str(certs.ca), cert_reqs="required",
                            min_version="TLSv1.3", alpn_protocols=["http/1.1"])
    assert context.verify_mode == ssl.CERT_REQUIRED and context.minimum_version == ssl.TLSVersion.TLSv1_3


@pytest.mark.parametrize("case, words", [
    ("missing cert", "setting 'certfile': cannot read"),
    ("missing key", "setting 'keyfile': cannot read"),
    ("mismatch", "does not hold the key of the certificate"),
    ("not a cert", "holds no PEM certificate"),
    ("not a key", "holds no usable PEM private key"),
    ("encrypted", "the key is encrypted; give its password"),
    ("wrong password", "holds no usable PEM private key"),
    ("no ca", "setting 'cert_reqs': required verifies client certificates against ca_certs"),
    ("bad ca", "setting 'ca_certs'"),
    ("ciphers", "setting 'ciphers'"),
])
def test_bad_material_is_a_config_error_naming_the_file(certs: Certs, tmp_path: Path, case: str, words: str) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("junk\n")
    cert, key = str(certs.server[0]), str(certs.server[1])
    args: dict[str, object] = {
        "missing cert": dict(certfile=str(tmp_path / "none.pem"), keyfile=key),
        "missing key": dict(certfile=cert, keyfile=str(tmp_path / "none.key")),
        "mismatch": dict(certfile=cert, keyfile=str(certs.client[1])),
        "not a cert": dict(certfile=str(junk), keyfile=key),
        "not a key": dict(certfile=cert, keyfile=str(junk)),
        "encrypted": dict(certfile=cert, keyfile=str(encrypted_key(certs, tmp_path, b"s3cret"))),
        "wrong password": dict(certfile=cert, keyfile=str(encrypted_key(certs, tmp_path, b"s3cret")), password="no"),
        "no ca": dict(certfile=cert, keyfile=key, cert_reqs="required"),
        "bad ca": dict(certfile=cert, keyfile=key, ca_certs=str(junk), cert_reqs="optional"),
        "ciphers": dict(certfile=cert, keyfile=key, ciphers="NO-SUCH-CIPHER"),
    }[case]
    with pytest.raises(ConfigError, match=words) as raised:
        build_context(**args)  # type: ignore[arg-type]
    named = [str(v) for k, v in args.items() if k in ("certfile", "keyfile", "ca_certs")]
    assert any(name in str(raised.value) for name in named) or "setting '" in str(raised.value)


def test_the_password_comes_from_a_file_or_a_named_variable(certs: Certs, tmp_path: Path) -> None:
    keyfile = str(encrypted_key(certs, tmp_path, b"s3cret"))
    secret = tmp_path / "key.pass"
    secret.write_text("s3cret\n")
    assert key_password(str(secret), None) == "s3cret"
    assert key_password(None, "TLS_KEY_PASSWORD", {"TLS_KEY_PASSWORD": "s3cret"}) == "s3cret"
    build_context(str(certs.server[0]), keyfile, key_password(str(secret), None))
    with pytest.raises(ConfigError, match="TLS_KEY_PASSWORD is not set"):
        key_password(None, "TLS_KEY_PASSWORD", {})
