"""Client tokens: who may connect, as whom, and whether they may publish.

With ``auth.mode = "jwt"`` a WebSocket handshake carries a JSON Web Token
(``Authorization: Bearer …``, or ``?token=…`` where a browser cannot set headers).
:class:`TokenVerifier` checks it with PyJWT, and answers a :class:`Grant` or a
:class:`Denial`; it reads no clock (``now`` is an argument) and does no I/O, so
every rule is tested by calling it. The rules:

- signed with ``auth.jwt_key`` (HS256), or verifiable with the public key in
  ``auth.jwt_public_key_file`` (RS256 for an RSA key, ES256 for a P-256 key); any
  other algorithm, ``none`` included, is refused;
- ``exp`` is required and must be in the future; ``nbf``, when present, in the past;
- ``aud`` must name ``auth.audience`` when that is set (and is ignored otherwise);
- ``sub``, when present, becomes the client id: 1 to 128 characters, none of them
  control characters;
- ``"publish": false`` makes a read-only client; ``publish`` is otherwise true,
  and anything but a boolean is refused.

The secret and the tokens are never logged.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any, TypeGuard

import jwt

from ebbcast.values import load_public_key

log = logging.getLogger(__name__)

#: RFC 7518 section 3.2: an HS256 key should be at least as long as the hash.
MIN_HS256_KEY_BYTES = 32
#: Longest ``sub`` taken as a client id.
MAX_SUBJECT_CHARS = 128
#: Longest token looked at (a header line is limited to 16 KiB anyway).
MAX_TOKEN_CHARS = 8192
#: The close code and reason a connection gets when its token expires.
EXPIRED_CLOSE_CODE = 4001
EXPIRED_CLOSE_REASON = "token expired"


@dataclass(frozen=True)
class Grant:
    """A valid token: what the connection may do, and until when."""

    #: ``sub``, or None when the token names no subject.
    client_id: str | None
    publish: bool
    #: ``exp``, in unix seconds.
    expires_at: float


@dataclass(frozen=True)
class Denial:
    """A token refused, and why (for the 401's body and the debug log)."""

    reason: str


class TokenVerifier:
    """Checks client tokens against one key (see the module's rules)."""

    def __init__(self, key: Any, algorithm: str, audience: str = "") -> None:
        self._key = key
        self._algorithms = [algorithm]
        self._audience = audience or None
        self._decoder = jwt.PyJWT(options={
            "require": ["exp"],
            # exp and nbf are checked against the ``now`` given, not PyJWT's clock
            "verify_exp": False, "verify_nbf": False, "verify_iat": False,
            "verify_aud": bool(audience), "verify_sub": True,
        })

    @classmethod
    def from_settings(cls, mode: str, secret: str, public_key_file: str,
                      audience: str) -> TokenVerifier | None:
        """The verifier auth.* asks for; None when ``mode`` is "none".

        Raises ValueError when the public key file cannot be used."""
        if mode != "jwt":
            return None
        if public_key_file:
            key, algorithm = load_public_key(public_key_file)
            return cls(key, algorithm, audience)
        if len(secret.encode()) < MIN_HS256_KEY_BYTES:
            log.warning("auth.jwt_key is shorter than %d bytes: a short HS256 secret can be "
                        "guessed offline from any token; use e.g. `openssl rand -base64 48`",
                        MIN_HS256_KEY_BYTES)
            # said once here, rather than by PyJWT at every handshake
            warnings.filterwarnings("ignore", category=jwt.InsecureKeyLengthWarning)
        return cls(secret.encode(), "HS256", audience)

    def verify(self, token: str | None, now: float) -> Grant | Denial:
        """What ``token`` (None: none was given) allows at unix time ``now``."""
        if not token:
            return Denial("a token is required (Authorization: Bearer, or ?token=)")
        if len(token) > MAX_TOKEN_CHARS:
            return Denial("token too long")
        try:
            claims = self._decoder.decode(token, self._key, algorithms=self._algorithms,
                                          audience=self._audience)
        except jwt.InvalidTokenError as exc:
            return Denial(_explain(exc))
        return grant_from(claims, now)


def grant_from(claims: dict[str, Any], now: float) -> Grant | Denial:
    """The grant of a token whose signature (and audience) checked out."""
    expires = claims.get("exp")
    if not _is_time(expires):
        return Denial("exp must be a number of seconds since the epoch")
    if expires <= now:
        return Denial("token expired")
    not_before = claims.get("nbf")
    if not_before is not None and (not _is_time(not_before) or not_before > now):
        return Denial("token not valid yet (nbf)")
    subject = claims.get("sub")
    if subject is not None and not valid_subject(subject):
        return Denial(f"sub must be 1 to {MAX_SUBJECT_CHARS} characters, no control "
                      "characters")
    publish = claims.get("publish", True)
    if not isinstance(publish, bool):
        return Denial("publish must be true or false")
    return Grant(subject, publish, float(expires))


def valid_subject(subject: object) -> bool:
    return isinstance(subject, str) and 0 < len(subject) <= MAX_SUBJECT_CHARS and \
        subject.isprintable()


def _is_time(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and value == value and abs(value) < 1e12


def _explain(exc: jwt.InvalidTokenError) -> str:
    if isinstance(exc, jwt.InvalidSignatureError):
        return "bad signature"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "algorithm not allowed"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "wrong audience"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"the token has no {exc.claim}"
    if isinstance(exc, jwt.DecodeError):
        return "not a valid token"
    return f"invalid token: {exc}"


def bearer_token(authorization: str | None, query_token: str | None) -> str | None:
    """The token of a handshake: the Authorization header's, else ``?token=``."""
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return query_token or None


def mint(secret: str, subject: str, ttl: float, read_only: bool = False,
         audience: str = "", now: float | None = None) -> str:
    """An HS256 token for ``subject``, valid ``ttl`` seconds (``ebbcast token``)."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"sub": subject, "iat": issued, "exp": issued + max(1, round(ttl))}
    if read_only:
        claims["publish"] = False
    if audience:
        claims["aud"] = audience
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        return jwt.encode(claims, secret.encode(), algorithm="HS256")
