"""Client tokens: who may connect, as whom, and whether they may publish.

With ``auth.mode = "jwt"`` a WebSocket handshake carries a JSON Web Token
(``Authorization: Bearer …``, or ``?token=…`` where a browser cannot set headers).
:class:`TokenVerifier` checks it with PyJWT, and answers a :class:`Grant` or a
:class:`Denial`; it reads no clock (``now`` is an argument) and does no I/O, so
every rule is tested by calling it. The rules:

- signed with ``auth.jwt_key`` (HS256), or verifiable with a key in
  ``auth.jwt_public_key_file``: one PEM public key (RS256 for an RSA key, ES256 for
  a P-256 key), or a JWKS of several, each with its own algorithm. A token whose
  header names a ``kid`` is checked with the key of that ``kid`` (or, when none
  has it, with the keys that have no ``kid``); a token without one, with each key
  in turn. Any other algorithm, ``none`` included, is refused;
- ``exp`` is required and must be in the future, ``nbf``, when present, in the
  past, both give or take ``auth.leeway`` (clocks differ); the connection is
  closed with 4001 at ``exp`` plus the leeway;
- ``aud`` must name ``auth.audience`` when that is set (and is ignored otherwise);
- ``sub``, when present, becomes the client id: 1 to 128 characters, none of them
  control characters;
- ``channels`` (names, or prefixes ending in ``*``) bounds the channels the
  client may subscribe to (absent: any); ``"publish": false`` makes a read-only
  client, ``true`` (the default) lets it publish to the global stream and to every
  channel it may subscribe to, and a list of the same form lets it publish to
  those channels only, not the global stream (``ebbcast.serving.channels``);
  anything else is refused.

The secret and the tokens are never logged.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any, TypeGuard

import jwt

from ebbcast.serving.channels import ChannelRights
from ebbcast.values import VerificationKey, parse_verification_keys, read_text_file

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
    #: Whether its text frames are broadcast on the global stream.
    publish: bool
    #: When the connection is closed with 4001: ``exp`` plus the leeway, in unix
    #: seconds.
    expires_at: float
    #: What it may do with channels (the ``channels`` and ``publish`` claims).
    rights: ChannelRights = ChannelRights()


@dataclass(frozen=True)
class Denial:
    """A token refused, and why (for the 401's body and the debug log)."""

    reason: str


class TokenVerifier:
    """Checks client tokens against a set of keys (see the module's rules)."""

    def __init__(self, keys: list[VerificationKey], audience: str = "",
                 leeway: float = 0.0) -> None:
        if not keys:
            raise ValueError("no key to verify tokens with")
        self._keys = keys
        self._kids = {key.kid for key in keys}
        self._audience = audience or None
        self._leeway = leeway
        self._decoder = jwt.PyJWT(options={
            "require": ["exp"],
            # exp and nbf are checked against the ``now`` given, not PyJWT's clock
            "verify_exp": False, "verify_nbf": False, "verify_iat": False,
            "verify_aud": bool(audience), "verify_sub": True,
        })

    @classmethod
    def from_settings(cls, mode: str, secret: str, public_key_file: str, audience: str,
                      leeway: float = 0.0, key_text: str | None = None) -> TokenVerifier | None:
        """The verifier auth.* asks for; None when ``mode`` is "none". ``key_text``
        is what ``public_key_file`` held when the configuration was loaded (read
        from the file when None).

        Raises ValueError when the key file cannot be used."""
        if mode != "jwt":
            return None
        if public_key_file:
            text = read_text_file(public_key_file, "a key file") if key_text is None \
                else key_text
            return cls(parse_verification_keys(text, public_key_file), audience, leeway)
        if len(secret.encode()) < MIN_HS256_KEY_BYTES:
            log.warning("the HS256 secret (auth.jwt_key or jwt_key_file) is shorter than "
                        "%d bytes: a short HS256 secret can be guessed offline from any "
                        "token; use e.g. `openssl rand -base64 48`", MIN_HS256_KEY_BYTES)
            # said once here, rather than by PyJWT at every handshake
            warnings.filterwarnings("ignore", category=jwt.InsecureKeyLengthWarning)
        return cls([VerificationKey(secret.encode(), "HS256")], audience, leeway)

    def verify(self, token: str | None, now: float) -> Grant | Denial:
        """What ``token`` (None: none was given) allows at unix time ``now``."""
        if not token:
            return Denial("a token is required (Authorization: Bearer, or ?token=)")
        if len(token) > MAX_TOKEN_CHARS:
            return Denial("token too long")
        candidates = self._keys
        if len(self._kids) > 1 or None not in self._kids:
            try:
                kid = jwt.get_unverified_header(token).get("kid")
            except jwt.InvalidTokenError as exc:
                return Denial(_explain(exc))
            if kid is not None:
                candidates = [key for key in self._keys if key.kid == kid] or \
                    [key for key in self._keys if key.kid is None]
                if not candidates:
                    return Denial("unknown key id (kid)")
        denial: Denial | None = None
        for key in candidates:
            try:
                claims = self._decoder.decode(token, key.key, algorithms=[key.algorithm],
                                              audience=self._audience)
            except (jwt.InvalidSignatureError, jwt.InvalidAlgorithmError) as exc:
                denial = _telling(denial, Denial(_explain(exc)))
                continue
            except jwt.InvalidTokenError as exc:
                return Denial(_explain(exc))
            except (jwt.PyJWTError, ValueError, TypeError) as exc:  # the key, not the token
                log.warning("a key of auth.jwt_public_key_file (kid %s) cannot check tokens: "
                            "%s", key.kid, exc)
                denial = _telling(denial, Denial("bad signature"))
                continue
            return grant_from(claims, now, self._leeway)
        assert denial is not None  # there is always a candidate
        return denial


def _telling(first: Denial | None, second: Denial) -> Denial:
    """Of two keys' answers, the one to give: a signature that did not check out
    with a key of the token's algorithm says more than an algorithm refused."""
    return first if first is not None and first.reason == "bad signature" else second


def grant_from(claims: dict[str, Any], now: float, leeway: float = 0.0) -> Grant | Denial:
    """The grant of a token whose signature (and audience) checked out, ``exp``
    and ``nbf`` given ``leeway`` seconds either way."""
    expires = claims.get("exp")
    if not _is_time(expires):
        return Denial("exp must be a number of seconds since the epoch")
    if expires + leeway <= now:
        return Denial("token expired")
    not_before = claims.get("nbf")
    if not_before is not None and (not _is_time(not_before) or not_before > now + leeway):
        return Denial("token not valid yet (nbf)")
    subject = claims.get("sub")
    if subject is not None and not valid_subject(subject):
        return Denial(f"sub must be 1 to {MAX_SUBJECT_CHARS} characters, no control "
                      "characters")
    rights = ChannelRights.from_claims(claims.get("channels"), claims.get("publish"))
    if isinstance(rights, str):
        return Denial(rights)
    return Grant(subject, rights.publish_global, float(expires) + leeway, rights)


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
