"""Secrets from files and rotation without a restart: ``admin.token_file``,
``auth.jwt_key_file``, a JWKS in ``auth.jwt_public_key_file`` (keys told apart by
``kid``), ``auth.leeway``; SIGHUP re-reads them, a bad new file is logged and the
old secret kept, and connected clients stay."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import signal
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.exceptions import InvalidStatus

from ebbcast.config import ConfigError, load_config, render_toml
from ebbcast.serving.auth import Denial, Grant, TokenVerifier
from helpers import DaemonProcess, dial, http_json, recv_frame

NOW = 1_800_000_000.0
SECRET = "s" * 40


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk(private: Any, kid: str | None) -> dict[str, Any]:
    """The public JWK of ``private`` (an RSA or EC key, or bytes for ``oct``)."""
    if isinstance(private, bytes):
        entry: dict[str, Any] = {"kty": "oct", "k": b64(private)}
    elif isinstance(private, rsa.RSAPrivateKey):
        entry = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    else:
        entry = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    if kid is not None:
        entry["kid"] = kid
    return entry


def write_jwks(path: Path, *keys: dict[str, Any]) -> str:
    path.write_text(json.dumps({"keys": list(keys)}))
    return str(path)


def sign(private: Any, kid: str | None, **claims: Any) -> str:
    algorithm = "HS256" if isinstance(private, bytes) else \
        "RS256" if isinstance(private, rsa.RSAPrivateKey) else "ES256"
    headers = {"kid": kid} if kid is not None else None
    body = {"sub": "alice", "exp": NOW + 60, **claims}
    return jwt.encode(body, private, algorithm=algorithm, headers=headers)


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {"rsa": rsa.generate_private_key(65537, 2048),
            "ec": ec.generate_private_key(ec.SECP256R1()),
            "oct": b"o" * 32}


def jwks_verifier(tmp_path: Path, *entries: dict[str, Any],
                  leeway: float = 0.0) -> TokenVerifier:
    made = TokenVerifier.from_settings("jwt", "", write_jwks(tmp_path / "jwks.json", *entries),
                                       "", leeway)
    assert made is not None
    return made


# -- the verifier ------------------------------------------------------------------

def test_a_jwks_verifies_each_key_by_its_kid(tmp_path: Path, keys: dict[str, Any]) -> None:
    checks = jwks_verifier(tmp_path, jwk(keys["rsa"], "r1"), jwk(keys["ec"], "e1"),
                           jwk(keys["oct"], "o1"))
    for name, kid in (("rsa", "r1"), ("ec", "e1"), ("oct", "o1")):
        assert checks.verify(sign(keys[name], kid), NOW) == Grant("alice", True, NOW + 60)
    # the right key under another key's kid: checked with that key only, and fails
    assert checks.verify(sign(keys["ec"], "r1"), NOW) == Denial("algorithm not allowed")
    other = rsa.generate_private_key(65537, 2048)
    assert checks.verify(sign(other, "r1"), NOW) == Denial("bad signature")
    assert checks.verify(sign(keys["rsa"], "gone"), NOW) == Denial("unknown key id (kid)")


def test_a_token_without_kid_is_tried_against_each_key(tmp_path: Path,
                                                       keys: dict[str, Any]) -> None:
    checks = jwks_verifier(tmp_path, jwk(keys["rsa"], "r1"), jwk(keys["ec"], "e1"))
    assert isinstance(checks.verify(sign(keys["ec"], None), NOW), Grant)
    assert isinstance(checks.verify(sign(keys["rsa"], None), NOW), Grant)
    stranger = ec.generate_private_key(ec.SECP256R1())
    assert checks.verify(sign(stranger, None), NOW) == Denial("bad signature")
    # an HS256 token forged with a public key's JWK as its secret: no key takes HS256
    secret = json.dumps(jwk(keys["rsa"], None)).encode()
    header = b64(json.dumps({"alg": "HS256"}).encode())
    signed = f"{header}.{b64(json.dumps({'exp': NOW + 60}).encode())}"
    forged = f"{signed}.{b64(hmac.new(secret, signed.encode(), hashlib.sha256).digest())}"
    assert checks.verify(forged, NOW) == Denial("algorithm not allowed")


def test_a_key_without_kid_takes_tokens_naming_a_kid_it_does_not_know(
        tmp_path: Path, keys: dict[str, Any]) -> None:
    checks = jwks_verifier(tmp_path, jwk(keys["rsa"], None), jwk(keys["ec"], "e1"))
    assert isinstance(checks.verify(sign(keys["rsa"], "whatever"), NOW), Grant)
    assert checks.verify(sign(keys["ec"], "whatever"), NOW) == Denial("algorithm not allowed")


@pytest.mark.parametrize("claims, at, answer", [
    ({"exp": NOW}, NOW + 29.9, Grant("alice", True, NOW + 30)),
    ({"exp": NOW}, NOW + 30, Denial("token expired")),
    ({"nbf": NOW + 30}, NOW, "granted"),
    ({"nbf": NOW + 30.5}, NOW, Denial("token not valid yet (nbf)")),
])
def test_the_leeway_applies_to_exp_and_nbf(claims: dict[str, Any], at: float,
                                           answer: Any) -> None:
    checks = TokenVerifier.from_settings("jwt", SECRET, "", "", leeway=30)
    assert checks is not None
    got = checks.verify(jwt.encode({"sub": "alice", "exp": NOW + 60, **claims},
                                   SECRET.encode(), algorithm="HS256"), at)
    assert isinstance(got, Grant) if answer == "granted" else got == answer


def test_a_key_that_cannot_check_a_token_refuses_it_and_is_logged(caplog: Any) -> None:
    """A key PyJWT cannot use for the token's algorithm (here a P-256 key said to be
    ES512, which a JWKS file is refused for) answers a 401, never an exception."""
    from cryptography.hazmat.primitives.asymmetric.ec import SECP521R1

    from ebbcast.values import VerificationKey

    p256 = ec.generate_private_key(ec.SECP256R1())
    checks = TokenVerifier([VerificationKey(p256.public_key(), "ES512", "k")])
    token = jwt.encode({"sub": "a", "exp": NOW + 60}, ec.generate_private_key(SECP521R1()),
                       algorithm="ES512", headers={"kid": "k"})
    assert checks.verify(token, NOW) == Denial("bad signature")
    assert "(kid k) cannot check tokens" in caplog.text


def test_the_leeway_is_at_most_five_minutes() -> None:
    assert load_config(None, env={}, overrides={"auth.leeway": "5m"}).auth.leeway == 300
    with pytest.raises(ConfigError) as long:
        load_config(None, env={}, overrides={"auth.leeway": "1h"})
    assert long.value.problems == [("auth.leeway", "must be at most 5m, got 3600s (from the "
                                    "command line)")]


# -- configuration -----------------------------------------------------------------

def test_secrets_come_from_files_without_their_newline(tmp_path: Path) -> None:
    (tmp_path / "admin").write_text("admin-token-1\n")
    (tmp_path / "jwt").write_text(f"{SECRET}\n")
    config = load_config(None, env={}, overrides={
        "admin.token_file": str(tmp_path / "admin"), "auth.mode": "jwt",
        "auth.jwt_key_file": str(tmp_path / "jwt")})
    assert (config.admin_token, config.jwt_secret) == ("admin-token-1", SECRET)
    assert config.admin.token == config.auth.jwt_key == ""
    rendered = render_toml(config, mask_secrets=False)
    assert "admin-token-1" not in rendered and SECRET not in rendered  # only their paths


@pytest.mark.parametrize("secret, file_key", [("admin.token", "admin.token_file"),
                                              ("auth.jwt_key", "auth.jwt_key_file")])
def test_a_secret_and_its_file_both_set_is_an_error_naming_both(
        tmp_path: Path, secret: str, file_key: str) -> None:
    (tmp_path / "s").write_text(SECRET)
    with pytest.raises(ConfigError) as both:
        load_config(None, env={}, overrides={secret: SECRET, file_key: str(tmp_path / "s")})
    [(key, reason)] = both.value.problems
    assert key == file_key and secret in reason and file_key in reason


@pytest.mark.parametrize("key, content, reason", [
    ("admin.token_file", None, "cannot read"),
    ("admin.token_file", "\n", "is empty"),
    ("admin.token_file", "two words", "must be printable ASCII without spaces"),
    ("auth.jwt_key_file", None, "cannot read"),
    ("auth.jwt_public_key_file", "{not json", "is not valid JSON"),
    ("auth.jwt_public_key_file", '{"keys": []}', "with at least one key"),
    ("auth.jwt_public_key_file", '{"keys": [{"kty": "oct", "k": "c2hvcnQ"}]}',
     "an oct key of 5 bytes; use 32 or more"),
    ("auth.jwt_public_key_file", '{"keys": [{"kty": "oct", "k": "%s", "kid": "a"}, '
     '{"kty": "oct", "k": "%s", "kid": "a"}]}' % (b64(b"x" * 32), b64(b"y" * 32)),
     "two keys have the same kid"),
    ("auth.jwt_public_key_file", '{"keys": [{"kty": "oct", "k": "%s", "alg": "none"}]}'
     % b64(b"x" * 32), "algorithm 'none' is not allowed"),
    ("auth.jwt_public_key_file", '{"keys": [{"kty": "XYZ"}]}', "cannot be used"),
    ("auth.jwt_public_key_file", json.dumps({"keys": [{**json.loads(
        jwt.algorithms.RSAAlgorithm.to_jwk(rsa.generate_private_key(65537, 2048))),
        "kid": "oops"}]}), "(oops) is a private key"),
    ("auth.jwt_public_key_file", json.dumps({"keys": [{**json.loads(
        jwt.algorithms.ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())),
        "alg": "ES512"}]}), "ES512 signs with secp521r1, the key is on secp256r1"),
])
def test_a_key_file_that_cannot_be_used_is_an_error_naming_it(
        tmp_path: Path, key: str, content: str | None, reason: str) -> None:
    path = tmp_path / "file"
    if content is not None:
        path.write_text(content)
    overrides = {key: str(path)}
    if key.startswith("auth."):
        overrides["auth.mode"] = "jwt"
    with pytest.raises(ConfigError) as problem:
        load_config(None, env={}, overrides=overrides)
    [(named, text)] = problem.value.problems
    assert named == key and reason in text, text


# -- the daemon: rotation by SIGHUP ------------------------------------------------------

def handshake_status(url: str) -> int:
    """101 when a client connects with this URL (closed at once), else the refusal."""
    try:
        dial(url).close()
    except InvalidStatus as refused:
        return refused.response.status_code
    return 101


def live(private: Any, kid: str, sub: str = "alice") -> str:
    return jwt.encode({"sub": sub, "exp": time.time() + 600}, private,
                      algorithm="RS256" if isinstance(private, rsa.RSAPrivateKey) else "ES256",
                      headers={"kid": kid})


def sighup(d: DaemonProcess, workers: int, applied: str) -> None:
    """SIGHUP, then wait until the main process and each serving process applied it
    (or, ``applied`` = "failed", refused it)."""
    mark = len(d.lines)
    d.signal(signal.SIGHUP)
    if applied == "failed":  # the main process says so, and does not forward it
        pattern, lines = r"config reload failed: keeping the running configuration", 1
    else:
        d.wait_for_log(rf"config reloaded: .*{applied}", start=mark)
        pattern, lines = rf"reload applied by this serving process: .*{applied}", workers
    for _ in range(lines):
        mark = d.wait_for_log_index(pattern, start=mark) + 1


@pytest.mark.processes
@pytest.mark.parametrize("workers", [1, 2])
def test_a_jwks_key_is_rotated_by_sighup_and_nobody_is_disconnected(
        spawn: Any, tmp_path: Path, keys: dict[str, Any], workers: int) -> None:
    old, new = keys["rsa"], keys["ec"]
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, jwk(old, "2026-old"))
    d = spawn("--port", "0", "--admin-port", "0", "--workers", str(workers),
              "--log-level", "debug",
              env={"EBBCAST_AUTH_MODE": "jwt", "EBBCAST_AUTH_JWT_PUBLIC_KEY_FILE": str(jwks),
                   "EBBCAST_ADMIN_TOKEN": "adm", "EBBCAST_BROADCAST_PERIODIC_INTERVAL": "0"})
    before = dial(f"{d.ws_url}?token={live(old, '2026-old', 'before')}")
    assert recv_frame(before, "welcome")["client_id"] == "before"
    assert handshake_status(f"{d.ws_url}?token={live(new, '2026-new')}") == 401

    write_jwks(jwks, jwk(old, "2026-old"), jwk(new, "2026-new"))  # the overlap
    sighup(d, workers, "auth.jwt_public_key_file")
    assert handshake_status(f"{d.ws_url}?token={live(old, '2026-old')}") == 101
    during = dial(f"{d.ws_url}?token={live(new, '2026-new', 'during')}")
    assert recv_frame(during, "welcome")["client_id"] == "during"

    write_jwks(jwks, jwk(new, "2026-new"))  # the old key removed
    sighup(d, workers, "auth.jwt_public_key_file")
    assert handshake_status(f"{d.ws_url}?token={live(old, '2026-old')}") == 401
    assert handshake_status(f"{d.ws_url}?token={live(new, '2026-new')}") == 101

    jwks.write_text('{"keys": [')  # a bad file: logged, the running keys kept
    sighup(d, workers, "failed")
    assert "auth.jwt_public_key_file" in d.wait_for_log(r"config reload: auth\.").string
    assert handshake_status(f"{d.ws_url}?token={live(new, '2026-new')}") == 101
    assert handshake_status(f"{d.ws_url}?token={live(old, '2026-old')}") == 401

    # both clients were there all along: the one of the removed key included
    assert http_json(d.admin_url + "/broadcast", "POST", b"still here", "adm")[0] == 202
    for ws in (before, during):
        assert recv_frame(ws)["text"] == "still here"
        ws.close()


@pytest.mark.processes
def test_the_admin_token_file_is_reread_on_sighup(spawn: Any, tmp_path: Path) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text("first-token\n")
    d = spawn("--port", "0", "--admin-port", "0", "--log-level", "debug",
              env={"EBBCAST_ADMIN_TOKEN_FILE": str(token_file)})

    def post(token: str) -> int:
        return http_json(d.admin_url + "/broadcast", "POST", b"x", token)[0]

    assert (post("first-token"), post("second-token")) == (202, 401)
    token_file.write_text("second-token\n")
    sighup(d, 1, "admin.token_file")
    assert (post("first-token"), post("second-token")) == (401, 202)
    token_file.write_text("")
    sighup(d, 1, "failed")
    d.wait_for_log(r"config reload: admin\.token_file: .* is empty")
    assert post("second-token") == 202
    assert "first-token" not in d.log_text() and "second-token" not in d.log_text()
