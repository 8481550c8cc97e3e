"""Parsers of configuration values the wings read the same way: networks, Sentinel
URLs, token verification keys (a PEM public key or a JWKS), secrets read from files,
and the environment variables Kubernetes sets for Services.

``ebbcast.config`` checks each value with these, and the modules that use the value
(``ebbcast.serving.forwarded``, ``ebbcast.backplane.sentinel``,
``ebbcast.serving.auth``) parse it with them, so a value that passes the check is
read the same way where it is used. Like ``ebbcast.config`` it imports no wing, and
no other ebbcast module at all: a main process of release 0.1.0, which keeps its own
``ebbcast.config`` in memory through an upgrade, loads it fresh
(``ebbcast.forwarded``, ``ebbcast.auth``).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


_NAME = r"EBBCAST(?:_[A-Z0-9_]+)?"  # the Service's name, from "ebbcast" on
_EACH = r"_\d+_(?:TCP|UDP|SCTP)"  # one port of it: number and protocol
_PORT = "_PORT" + _EACH
#: The variables Kubernetes sets for a Service whose name begins with "ebbcast" (its
#: service links, pkg/kubelet/envvars), each with the value it always has.
_SERVICE_LINKS: tuple[tuple[re.Pattern[str], Callable[[str], object]], ...] = (
    (re.compile(_NAME + r"_SERVICE_HOST"), _is_address),
    (re.compile(_NAME + r"_SERVICE_PORT(?:_[A-Z0-9_]+)?"), str.isdigit),
    (re.compile(_NAME + rf"_PORT(?:{_EACH})?"),
     re.compile(r"(?:tcp|udp|sctp)://(?:\[[0-9a-fA-F:]+\]|[0-9.]+):\d+").fullmatch),
    (re.compile(_NAME + _PORT + "_PROTO"), ("tcp", "udp", "sctp").__contains__),
    (re.compile(_NAME + _PORT + "_PORT"), str.isdigit),
    (re.compile(_NAME + _PORT + "_ADDR"), _is_address),
)


def is_service_link(var: str, value: str) -> bool:
    """Whether ``var=value`` is one Kubernetes set for a Service (not for ebbcast):
    a service link's name with the value that name always has. So EBBCAST_ADMIN_PORT
    is a link as ``tcp://10.96.0.13:8001`` (Service "ebbcast-admin") and a setting
    as ``8001``, and a typo such as EBBCAST_BACKPLANE_PORT=6379 is neither."""
    return any(name.fullmatch(var) and bool(fits(value.strip()))
               for name, fits in _SERVICE_LINKS)


def parse_network(text: str) -> Network:
    """An address or CIDR (``"10.0.0.0/8"``, ``"::1"``); ValueError if neither."""
    return ipaddress.ip_network(text.strip(), strict=False)


SENTINEL_SCHEME = "redis+sentinel"


@dataclass(frozen=True)
class SentinelURL:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int
    username: str | None
    password: str | None
    sentinel_password: str | None


def parse_sentinel_url(url: str) -> SentinelURL:
    """The parts of a ``redis+sentinel://`` URL; ValueError naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"not a {SENTINEL_SCHEME}:// URL")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(secret) if colon else None)
        if not colon:  # redis://secret@host is a password alone, as redis-py reads it
            username, password = None, unquote(user)
    sentinels = []
    for hostport in hosts.split(","):
        host, colon, port = hostport.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"each sentinel must be HOST:PORT, got {hostport!r}")
        sentinels.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError("the path must be /MASTER_NAME or /MASTER_NAME/DB")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"the database must be a number, got {path[1]!r}")
    query = parse_qs(parts.query)
    unknown = set(query) - {"sentinel_password"}
    if unknown:
        raise ValueError(f"unknown query parameter(s): {', '.join(sorted(unknown))}")
    return SentinelURL(tuple(sentinels), unquote(path[0]), int(path[1]) if len(path) == 2
                       else 0, username, password,
                       query.get("sentinel_password", [None])[0])


#: Algorithms a key in a JWKS may be used with (``none`` never is).
JWKS_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                             "ES256", "ES384", "ES512", "HS256", "HS384", "HS512", "EdDSA"})
#: RFC 7518 section 3.2: an HMAC key at least as long as the hash (HS256).
MIN_HMAC_KEY_BYTES = 32
#: Largest key file read (a JWKS of a few dozen RSA keys is well under this).
MAX_KEY_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class VerificationKey:
    """A key tokens may be signed with: the key, its one algorithm and its ``kid``
    (None for a PEM file or ``auth.jwt_key``)."""

    key: Any
    algorithm: str
    kid: str | None = None


def read_text_file(path: str, what: str) -> str:
    """The contents of a small file holding a secret or keys; ValueError naming it."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ValueError(f"{path} is larger than {MAX_KEY_FILE_BYTES} bytes: not {what}")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text: not {what}") from None


def read_secret_file(path: str) -> str:
    """A secret kept in a file: its contents without surrounding whitespace (the
    newline an editor or ``echo`` adds); ValueError when unreadable or empty."""
    secret = read_text_file(path, "a secret").strip()
    if not secret:
        raise ValueError(f"{path} is empty")
    return secret


def parse_verification_keys(text: str, path: str) -> list[VerificationKey]:
    """The keys of a key file: one PEM public key, or a JWKS (``{"keys": [...]}``,
    RSA, EC, OKP and ``oct`` keys, told apart by ``kid``). ValueError naming what
    is wrong."""
    if text.lstrip().startswith("{"):
        return _parse_jwks(text, path)
    return [_pem_key(text.encode(), path)]


def load_public_key(path: str) -> tuple[Any, str]:
    """The key in a PEM file and its algorithm: RS256 for RSA, ES256 for P-256.

    Raises ValueError naming what is wrong."""
    try:
        with open(path, "rb") as fh:
            pem = fh.read()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    found = _pem_key(pem, path)
    return found.key, found.algorithm


def _pem_key(pem: bytes, path: str) -> VerificationKey:
    # here, not at the top: only a configuration with a key file loads cryptography
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not a PEM public key or a JWKS: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError(f"{path}: an RSA key of {key.key_size} bits; use 2048 or more")
        return VerificationKey(key, "RS256")
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return VerificationKey(key, "ES256")
    raise ValueError(f"{path}: use an RSA key (RS256) or an EC P-256 key (ES256)")


def _parse_jwks(text: str, path: str) -> list[VerificationKey]:
    import jwt  # here, not at the top, for the reason _pem_key gives

    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: a JWKS is {{\"keys\": [...]}} with at least one key")
    keys: list[VerificationKey] = []
    for number, entry in enumerate(entries, 1):
        where = f"{path}: key {number}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is not a JSON object")
        kid = entry.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise ValueError(f"{where}: kid must be a string")
        if entry.get("use", "sig") != "sig":
            continue  # an encryption key published beside the signing keys
        if entry.get("kty") != "oct" and "d" in entry:
            raise ValueError(f"{where} ({kid or 'no kid'}) is a private key: the file "
                             "should hold only public keys")
        if "alg" in entry and entry["alg"] not in JWKS_ALGORITHMS:
            raise ValueError(f"{where} ({kid or 'no kid'}): algorithm {entry['alg']!r} is "
                             "not allowed")
        try:
            jwk = jwt.PyJWK(entry)
        except Exception as exc:  # whatever PyJWT makes of a key it cannot read
            raise ValueError(f"{where} ({kid or 'no kid'}) cannot be used: "
                             f"{exc or type(exc).__name__}") from None
        if jwk.algorithm_name not in JWKS_ALGORITHMS:
            raise ValueError(f"{where} ({kid or 'no kid'}): algorithm "
                             f"{jwk.algorithm_name} is not allowed")
        _check_strength(jwk, f"{where} ({kid or 'no kid'})")
        _check_curve(jwk, f"{where} ({kid or 'no kid'})")
        keys.append(VerificationKey(jwk.key, jwk.algorithm_name, kid))
    kids = [k.kid for k in keys if k.kid is not None]
    if len(kids) != len(set(kids)):
        raise ValueError(f"{path}: two keys have the same kid")
    if not keys:
        raise ValueError(f"{path}: no signing key (every key has a \"use\" other than sig)")
    return keys


#: The curve each ECDSA algorithm signs with.
_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}


def _check_curve(jwk: Any, where: str) -> None:
    """An EC key's curve must be its algorithm's (PyJWT would refuse every token)."""
    wanted = _CURVES.get(jwk.algorithm_name)
    curve = getattr(getattr(jwk.key, "curve", None), "name", None)
    if wanted and curve != wanted:
        raise ValueError(f"{where}: {jwk.algorithm_name} signs with {wanted}, the key is "
                         f"on {curve}")


def _check_strength(jwk: Any, where: str) -> None:
    if isinstance(jwk.key, bytes):
        if len(jwk.key) < MIN_HMAC_KEY_BYTES:
            raise ValueError(f"{where}: an oct key of {len(jwk.key)} bytes; use "
                             f"{MIN_HMAC_KEY_BYTES} or more")
        return
    size = getattr(jwk.key, "key_size", None)
    if jwk.algorithm_name[:2] in ("RS", "PS") and size is not None and size < 2048:
        raise ValueError(f"{where}: an RSA key of {size} bits; use 2048 or more")
