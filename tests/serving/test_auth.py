"""Client tokens (auth.mode = "jwt"): the verifier's rules called directly, the
handshake's answers, and the daemon enforcing them on real connections: 401 on
the handshake, sub as the client id, read-only clients, 4001 at expiry, the
``ebbcast token`` and ``ebbcast client --token`` commands."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from ebbcast.serving.auth import Denial, Grant, TokenVerifier, bearer_token, mint
from ebbcast.serving.channels import NO_CHANNEL, ChannelRights
from ebbcast.config import ConfigError, load_config, render_toml
from ebbcast.serving.handshake import Acceptance, Refusal, Terms, decide
from helpers import STEP_TIMEOUT, metric, recv_json, recv_until, wait_until

KEY = "k" * 40
NOW = 1_800_000_000.0
HANDSHAKE = {"host": "example.org", "upgrade": "websocket", "connection": "Upgrade",
             "sec-websocket-version": "13", "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="}


def hs256(claims: dict[str, Any], key: str = KEY) -> str:
    return jwt.encode(claims, key.encode(), algorithm="HS256")


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": NOW + 60, **extra}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(payload: dict[str, Any]) -> str:
    """A token with ``alg: none`` and no signature."""
    header = json.dumps({"alg": "none", "typ": "JWT"}).encode()
    return f"{b64(header)}.{b64(json.dumps(payload).encode())}."


def forged_hs256(payload: dict[str, Any], secret: bytes) -> str:
    """An HS256 token made by hand (PyJWT refuses a PEM as an HMAC secret)."""
    header = json.dumps({"alg": "HS256", "typ": "JWT"}).encode()
    signed = f"{b64(header)}.{b64(json.dumps(payload).encode())}"
    return f"{signed}.{b64(hmac.new(secret, signed.encode(), hashlib.sha256).digest())}"


# -- the verifier ------------------------------------------------------------------

def verifier(audience: str = "") -> TokenVerifier:
    made = TokenVerifier.from_settings("jwt", KEY, "", audience)
    assert made is not None
    return made


def test_a_valid_token_grants_its_subject_until_exp() -> None:
    assert verifier().verify(hs256(claims()), NOW) == Grant("alice", True, NOW + 60)


def test_publish_false_makes_a_read_only_grant() -> None:
    grant = verifier().verify(hs256(claims(publish=False)), NOW)
    assert isinstance(grant, Grant) and grant.publish is False


@pytest.mark.parametrize("token, reason", [
    (None, "a token is required (Authorization: Bearer, or ?token=)"),
    ("", "a token is required (Authorization: Bearer, or ?token=)"),
    ("not.a.token", "not a valid token"),
    (hs256(claims(), key="another-key-of-forty-bytes-or-so-------"), "bad signature"),
    (unsigned(claims()), "algorithm not allowed"),
    (hs256({"sub": "alice"}), "the token has no exp"),
    (hs256(claims(exp=NOW)), "token expired"),
    (hs256(claims(exp=NOW - 1)), "token expired"),
    (hs256(claims(exp="tomorrow")), "exp must be a number of seconds since the epoch"),
    (hs256(claims(nbf=NOW + 5)), "token not valid yet (nbf)"),
    (hs256(claims(sub="")), "sub must be 1 to 128 characters, no control characters"),
    (hs256(claims(sub="a\nb")), "sub must be 1 to 128 characters, no control characters"),
    (hs256(claims(sub="x" * 129)), "sub must be 1 to 128 characters, no control characters"),
    (hs256(claims(publish="no")),
     "publish must be true, false or a list of channel names or prefixes"),
    (hs256(claims(channels="scores")),
     "channels must be a list of channel names or prefixes ending in *"),
    (hs256(claims(channels=["bad name"])),
     "channels must be a list of channel names or prefixes ending in *"),
    ("x" * 9000, "token too long"),
])
def test_a_token_breaking_a_rule_is_denied_for_that_rule(token: str | None,
                                                         reason: str) -> None:
    assert verifier().verify(token, NOW) == Denial(reason)


def test_nbf_and_iat_in_the_past_are_fine_and_iat_is_not_checked() -> None:
    token = hs256(claims(nbf=NOW - 1, iat=NOW + 3600))
    assert isinstance(verifier().verify(token, NOW), Grant)


def test_the_audience_is_checked_only_when_configured() -> None:
    assert verifier("chat").verify(hs256(claims(aud="other")), NOW) == Denial("wrong audience")
    assert verifier("chat").verify(hs256(claims()), NOW) == Denial("the token has no aud")
    assert isinstance(verifier("chat").verify(hs256(claims(aud="chat")), NOW), Grant)
    assert isinstance(verifier("chat").verify(hs256(claims(aud=["x", "chat"])), NOW), Grant)
    assert isinstance(verifier().verify(hs256(claims(aud="anything")), NOW), Grant)


def test_mode_none_has_no_verifier() -> None:
    assert TokenVerifier.from_settings("none", KEY, "", "") is None


def _write_public(tmp_path: Path, private: Any) -> str:
    path = tmp_path / "public.pem"
    path.write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return str(path)


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_a_public_key_file_verifies_its_algorithm_only(tmp_path: Path, algorithm: str) -> None:
    private = rsa.generate_private_key(65537, 2048) if algorithm == "RS256" \
        else ec.generate_private_key(ec.SECP256R1())
    path = _write_public(tmp_path, private)
    checks = TokenVerifier.from_settings("jwt", "", path, "")
    assert checks is not None
    assert checks.verify(jwt.encode(claims(), private, algorithm=algorithm), NOW) == \
        Grant("alice", True, NOW + 60)
    # the classic confusion: the public key's PEM used as an HS256 secret
    forged = forged_hs256(claims(), Path(path).read_bytes())
    assert checks.verify(forged, NOW) == Denial("algorithm not allowed")
    other = rsa.generate_private_key(65537, 2048) if algorithm == "RS256" \
        else ec.generate_private_key(ec.SECP256R1())
    assert checks.verify(jwt.encode(claims(), other, algorithm=algorithm), NOW) == \
        Denial("bad signature")


def test_the_authorization_header_wins_over_the_query() -> None:
    assert bearer_token("Bearer abc", "xyz") == "abc"
    assert bearer_token("bearer  abc ", None) == "abc"
    assert bearer_token("Basic abc", "xyz") == "xyz"
    assert bearer_token(None, "xyz") == "xyz"
    assert bearer_token("Bearer ", "") is None


def test_mint_makes_tokens_the_verifier_accepts() -> None:
    token = mint(KEY, "bob", 90, read_only=True, audience="chat", now=NOW)
    assert verifier("chat").verify(token, NOW) == Grant(
        "bob", False, NOW + 90, ChannelRights(publish=NO_CHANNEL, publish_global=False))
    assert verifier("chat").verify(token, NOW + 90) == Denial("token expired")


# -- the handshake -----------------------------------------------------------------

def terms(**changes: Any) -> Terms:
    return Terms(accepting=True, full=False, allowed_origins=[], tokens=verifier(), now=NOW,
                 **changes)


def test_the_handshake_takes_the_token_from_the_query_or_the_header() -> None:
    by_query = decide(None, f"token={hs256(claims())}", HANDSHAKE, terms())
    by_header = decide(None, "", {**HANDSHAKE, "authorization": f"Bearer {hs256(claims())}"},
                       terms())
    for answer in (by_query, by_header):
        assert isinstance(answer, Acceptance)
        assert answer.client_id == "alice"
        assert answer.grant == Grant("alice", True, NOW + 60)


def test_a_refused_token_is_a_401_counted_as_auth_with_a_challenge() -> None:
    answer = decide(None, "", HANDSHAKE, terms())
    assert answer == Refusal(401, "unauthorized: a token is required (Authorization: "
                             "Bearer, or ?token=)\n", "auth",
                             (("WWW-Authenticate", 'Bearer realm="ebbcast"'),))


def test_a_path_client_id_must_be_the_tokens_sub() -> None:
    token = f"token={hs256(claims())}"
    refused = decide("mallory", token, HANDSHAKE, terms())
    assert isinstance(refused, Refusal) and refused.status == 401
    assert refused.text == "unauthorized: the token is for another client id\n"
    same = decide("alice", token, HANDSHAKE, terms())
    assert isinstance(same, Acceptance) and same.client_id == "alice"
    anonymous = decide("carol", f"token={hs256({'exp': NOW + 5})}", HANDSHAKE, terms())
    assert isinstance(anonymous, Acceptance) and anonymous.client_id == "carol"


def test_other_rules_come_before_the_token() -> None:
    bad_version = decide(None, "", {**HANDSHAKE, "sec-websocket-version": "8"}, terms())
    assert isinstance(bad_version, Refusal) and bad_version.status == 426
    draining = decide(None, "", HANDSHAKE, Terms(accepting=False, full=False,
                                                 allowed_origins=[], tokens=verifier(), now=NOW))
    assert isinstance(draining, Refusal) and draining.counted_as == "draining"


# -- configuration -----------------------------------------------------------------

def test_jwt_mode_needs_exactly_one_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as none:
        load_config(None, env={}, overrides={"auth.mode": "jwt"})
    assert [key for key, _ in none.value.problems] == ["auth.mode"]
    private = ec.generate_private_key(ec.SECP256R1())
    path = _write_public(tmp_path, private)
    with pytest.raises(ConfigError) as both:
        load_config(None, env={}, overrides={"auth.mode": "jwt", "auth.jwt_key": KEY,
                                             "auth.jwt_public_key_file": path})
    assert [key for key, _ in both.value.problems] == ["auth.jwt_key"]
    assert load_config(None, env={}, overrides={"auth.mode": "jwt",
                                                "auth.jwt_public_key_file": path})


@pytest.mark.parametrize("content, reason", [
    (None, "cannot read"), (b"not a key", "is not a PEM public key"),
])
def test_a_public_key_file_that_cannot_be_used_is_a_config_error(
        tmp_path: Path, content: bytes | None, reason: str) -> None:
    path = tmp_path / "key.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as problem:
        load_config(None, env={}, overrides={"auth.mode": "jwt",
                                             "auth.jwt_public_key_file": str(path)})
    [(key, text)] = problem.value.problems
    assert key == "auth.jwt_public_key_file" and reason in text


def test_the_jwt_key_comes_from_the_environment_and_is_never_printed() -> None:
    config = load_config(None, env={"EBBCAST_AUTH_MODE": "jwt", "EBBCAST_AUTH_JWT_KEY": KEY})
    assert config.auth.jwt_key == KEY
    rendered = render_toml(config)
    assert KEY not in rendered and 'jwt_key = "********"' in rendered


# -- the daemon --------------------------------------------------------------------

def live(ttl: float = 60, **extra: Any) -> str:
    return hs256({"sub": "alice", "exp": time.time() + ttl, **extra})


async def refused_status(url: str, **kwargs: Any) -> int:
    with pytest.raises(HTTPClientError) as refused:
        await asyncio.wait_for(websocket_connect(HTTPRequest(url, **kwargs)), STEP_TIMEOUT)
    return refused.value.code


JWT = {"auth__mode": "jwt", "auth__jwt_key": KEY}


async def welcomed(d: Any, **token_claims: Any) -> Any:
    """A client connected with a token of ``token_claims``, its welcome read."""
    conn = await d.connect(f"?token={live(**token_claims)}")
    assert (await recv_json(conn))["type"] == "welcome"
    return conn


async def test_the_daemon_accepts_a_token_and_names_the_client_by_its_sub(
        start_daemon: Any) -> None:
    d = await start_daemon(**JWT)
    conn = await d.connect(f"?token={live()}")
    assert (await recv_json(conn))["client_id"] == "alice"
    by_header = await d.connect("", headers={"Authorization": f"Bearer {live(sub='bob')}"})
    assert (await recv_json(by_header))["client_id"] == "bob"


async def test_the_daemon_refuses_bad_tokens_with_401_counted_as_auth(
        start_daemon: Any) -> None:
    d = await start_daemon(**JWT, auth__audience="chat")
    bad = [
        "",                                                        # none at all
        f"?token={live(aud='chat')[:-3]}abc",                      # tampered signature
        f"?token={hs256(claims(exp=time.time() + 60, aud='chat'), key='x' * 40)}",
        f"?token={unsigned(claims(exp=time.time() + 60, aud='chat'))}",  # alg none
        f"?token={live(aud='other')}",                             # wrong audience
        f"?token={live(ttl=-31, aud='chat')}",                     # expired beyond the leeway
        f"/mallory?token={live(aud='chat')}",                      # another client id
    ]
    for path in bad:
        assert await refused_status(d.ws_url + path) == 401, path
    rejected = d.daemon.ctx.metrics.rejected.labels("auth")._value.get()
    assert rejected == len(bad)
    conn = await d.connect(f"?token={live(aud='chat')}")
    assert (await recv_json(conn))["type"] == "welcome"


async def test_a_connection_is_closed_with_4001_when_its_token_expires(
        start_daemon: Any) -> None:
    d = await start_daemon(**JWT, auth__leeway="1s")
    lasting = await welcomed(d, ttl=60, sub="lasting")
    # long enough to connect on a busy machine, short enough to wait for
    expires_at = time.time() + STEP_TIMEOUT / 4
    expiring = await d.connect(f"?token={hs256({'sub': 'alice', 'exp': expires_at})}")
    assert (await recv_json(expiring))["type"] == "welcome"
    while await asyncio.wait_for(expiring.read_message(), STEP_TIMEOUT) is not None:
        pass
    assert time.time() >= expires_at + 1  # closed at its exp plus the leeway, not before
    assert (expiring.close_code, expiring.close_reason) == (4001, "token expired")
    expired = d.daemon.ctx.metrics.disconnections.labels("token_expired")
    await wait_until(lambda: expired._value.get() == 1)  # counted when the close completes
    # the other connection was left alone: it still gets broadcasts
    await lasting.write_message("still here")
    assert (await recv_until(lasting, "message"))["text"] == "still here"


async def test_a_read_only_clients_frames_get_an_error_and_reach_no_one(
        start_daemon: Any) -> None:
    d = await start_daemon(**JWT)
    watcher = await welcomed(d, sub="watcher")
    reader = await welcomed(d, sub="reader", publish=False)
    writer = await welcomed(d, sub="writer")
    await reader.write_message("from the reader")
    assert await recv_json(reader) == {"type": "error", "error": "read_only"}
    await writer.write_message("from the writer")
    first = await recv_until(watcher, "message")
    assert (first["from"], first["text"]) == ("writer", "from the writer")
    # the reader still receives what others publish
    assert (await recv_until(reader, "message"))["from"] == "writer"


# -- the commands ------------------------------------------------------------------

def ebbcast(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ebbcast", *args], capture_output=True,
                          text=True, timeout=STEP_TIMEOUT * 3, env=env)


@pytest.mark.processes
def test_ebbcast_token_mints_with_the_configured_key(tmp_path: Path) -> None:
    config = tmp_path / "ebbcast.toml"
    config.write_text(f'[auth]\nmode = "jwt"\njwt_key = "{KEY}"\naudience = "chat"\n')
    done = ebbcast("token", "--sub", "dave", "--ttl", "2m", "--read-only",
                   "--config", str(config))
    assert done.returncode == 0, done.stderr
    claims_ = jwt.decode(done.stdout.strip(), KEY.encode(), algorithms=["HS256"],
                         audience="chat")
    assert claims_["sub"] == "dave" and claims_["publish"] is False
    assert claims_["exp"] - claims_["iat"] == 120
    assert KEY not in done.stdout + done.stderr


@pytest.mark.processes
def test_ebbcast_token_without_a_key_is_a_usage_error() -> None:
    done = ebbcast("token", "--sub", "dave", env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 2
    assert "auth.jwt_key: not set" in done.stderr


def test_the_client_command_sends_its_token_and_stops_on_401(spawn: Any) -> None:
    d = spawn("--port", "0", "--admin-port", "0", "--log-level", "debug",
              env={"EBBCAST_AUTH_MODE": "jwt", "EBBCAST_AUTH_JWT_KEY": KEY,
                   "EBBCAST_BROADCAST_PERIODIC_INTERVAL": "0"})
    token = ebbcast("token", "--sub", "erin", env={"EBBCAST_AUTH_JWT_KEY": KEY}).stdout.strip()
    ok = ebbcast("client", d.ws_url, "--token", token, "--count", "1")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["client_id"] == "erin"
    refused = ebbcast("client", d.ws_url, "--token", "nonsense", "--reconnect",
                      "--listen", "30s")
    assert refused.returncode == 1
    assert "the token was refused (HTTP 401)" in refused.stderr
    # neither the key nor a token reaches the log, even at debug
    d.wait_for_log(r"refused WebSocket handshake .* 401 auth")
    assert KEY not in d.log_text() and token not in d.log_text()


def test_the_reconnecting_client_exits_1_once_its_expired_token_is_refused(
        spawn: Any) -> None:
    """4001 at the token's exp: the client reconnects as it would after any close,
    with the token it has, which is refused now (401): it stops with exit 1."""
    d = spawn("--port", "0", "--admin-port", "0",
              env={"EBBCAST_AUTH_MODE": "jwt", "EBBCAST_AUTH_JWT_KEY": KEY,
                   "EBBCAST_AUTH_LEEWAY": "0", "EBBCAST_BROADCAST_PERIODIC_INTERVAL": "0"})
    expires_at = time.time() + STEP_TIMEOUT / 4  # time enough to connect first
    token = hs256({"sub": "frank", "exp": expires_at})
    done = ebbcast("client", d.ws_url, "--token", token, "--reconnect", "--listen", "60s")
    assert time.time() >= expires_at
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout.splitlines()[0])["client_id"] == "frank"  # it was in
    assert "the token was refused (HTTP 401)" in done.stderr
    assert metric(d, 'ebbcast_disconnections_total{reason="token_expired"}') == 1


def test_workers_check_tokens_with_the_key_from_the_environment(spawn: Any) -> None:
    d = spawn("--port", "0", "--admin-port", "0", "--workers", "2",
              env={"EBBCAST_AUTH_MODE": "jwt", "EBBCAST_AUTH_JWT_KEY": KEY})
    for sub in ("w1", "w2", "w3", "w4"):
        ok = ebbcast("client", d.ws_url, "--token", live(sub=sub), "--count", "1")
        assert json.loads(ok.stdout)["client_id"] == sub, ok.stderr
    refused = ebbcast("client", d.ws_url, "--count", "1")
    assert refused.returncode == 1 and "401" in refused.stderr
    as_admin = ebbcast("client", d.ws_url, "--token", live(sub="admin"), "--count", "1")
    assert as_admin.returncode == 1 and "401" in as_admin.stderr  # no client speaks as admin
