"""Parsers of configuration values the wings read the same way: networks, Sentinel
URLs, PEM public keys.

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
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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


def load_public_key(path: str) -> tuple[Any, str]:
    """The key in a PEM file and its algorithm: RS256 for RSA, ES256 for P-256.

    Raises ValueError naming what is wrong."""
    # here, not at the top: only a configuration with a key file loads cryptography
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        with open(path, "rb") as fh:
            pem = fh.read()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not a PEM public key: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError(f"{path}: an RSA key of {key.key_size} bits; use 2048 or more")
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key, "ES256"
    raise ValueError(f"{path}: use an RSA key (RS256) or an EC P-256 key (ES256)")
