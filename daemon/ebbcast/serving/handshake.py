"""The WebSocket opening handshake (RFC 6455 section 4.2), decided without I/O.

``answer()`` takes a request as either reader read it (:class:`Request`: the fast
path's httptools parse of a handshake already in the socket, or Tornado's HTTP/1
reader) and what the daemon is (accepting? full? which origins?) and returns an
:class:`Acceptance`, a :class:`Refusal`, or None for a request that is not a
handshake (another path or method: the HTTP application answers it). Both readers
call it, so a request gets one answer whichever reads it. It reads and writes
nothing, so every rule is tested by calling it; ``ebbcast.serving.handlers`` does the I/O.
The rules, in the order they are checked:

- request line and headers over MAX_HEADER_BLOCK bytes (any path): 431;
- not a GET of ``{ws_path}`` or ``{ws_path}/{id}``: None (not a handshake);
- a handshake must be a plain HTTP/1.1 GET of a path (RFC 6455 4.1): a target with
  a ``#fragment``, another HTTP version, no single ``Host`` (RFC 9112 3.2), or a
  body (``Content-Length`` or ``Transfer-Encoding``): 400;

then ``decide()``, for a well-formed handshake:

- a path ``{ws_path}/{id}`` whose id is not 1 to 64 of ``A-Z a-z 0-9 _ . ~ -``, or
  is ``admin`` (reserved: broadcasts from the admin API are ``from`` it): 400
  (counted as rejected ``client_id``);
- the daemon is draining: 503 with ``Retry-After: 1`` (``draining``);
- server.max_connections is reached: 503 with ``Retry-After: 1`` (``max_connections``);
- ``since`` is not an offset: 400;
- no ``Upgrade: websocket``, or no ``upgrade`` in ``Connection``: 400;
- an origin the daemon does not serve: 403 (``origin``);
- ``Sec-WebSocket-Version`` not 13: 426 with ``Sec-WebSocket-Version: 13``;
- no ``Host``, or a ``Sec-WebSocket-Key`` that is not 16 bytes in base64: 400;
- with client tokens (auth.mode = "jwt"), a missing, invalid or expired token, or
  one whose ``sub`` is not the id in the path, or is ``admin``: 401 (``auth``; see
  ``ebbcast.serving.auth``);
- ``?channels=a,b``: a name that is not a channel's, or more than
  channels.max_per_connection of them: 400; a channel the token does not allow:
  403; each reason naming the channel.

An origin is served when the browser says the request is same-origin
(``Sec-Fetch-Site: same-origin`` or ``none``), when the request has neither
``Sec-Fetch-Site`` nor ``Origin`` (not a browser), when the origin's host is the
``Host`` asked for, or when server.allowed_origins names it (``*``: any).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

import httptools

from ebbcast.backplane.history import Resume
from ebbcast.core.frames import ADMIN_SENDER
from ebbcast.serving.auth import Denial, Grant, TokenVerifier, bearer_token
from ebbcast.serving.channels import ChannelRights, valid_channel

#: Longest request line and header fields on the public listener (each field counted
#: as ``name: value`` and its line end, the blanks around the value not counted): a
#: longer request is answered 431.
MAX_HEADER_BLOCK = 16 * 1024

#: Ids a client may choose in /ws/{client_id}.
CLIENT_ID_PATTERN = r"[A-Za-z0-9_.~-]{1,64}"
_CLIENT_ID = re.compile(CLIENT_ID_PATTERN)
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_LONGEST_OFFSET = 18


@dataclass(frozen=True)
class Refusal:
    """An HTTP answer instead of the upgrade."""

    status: int
    text: str
    #: The ``ebbcast_connections_rejected_total`` label, when the refusal is counted.
    counted_as: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Acceptance:
    """The upgrade goes ahead: ``response`` is the whole 101 answer."""

    client_id: str | None
    resume: Resume | None
    response: bytes
    #: What the client's token allows (None without client tokens).
    grant: Grant | None = None
    #: The channels it subscribes to at once (``?channels=``).
    channels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Request:
    """An HTTP request's line and headers, as a reader read them (body not read)."""

    method: str
    #: The request-target as sent: path, ``?query`` and anything after.
    target: str
    version: str
    #: Looked up by lower-case names; a repeated header's values joined with ",".
    headers: Mapping[str, str]
    #: How many ``Host`` fields the request has.
    hosts: int
    #: Whether a body is announced (``Content-Length`` or ``Transfer-Encoding``).
    body: bool
    #: The request line and header fields in bytes (see MAX_HEADER_BLOCK).
    size: int


def header_block_size(start_line: str, fields: Iterable[tuple[str, str]]) -> int:
    """Bytes of a request line and header fields, each field as ``name: value``."""
    return len(start_line) + 2 + sum(len(name) + len(value) + 4 for name, value in fields)


def split_target(target: str) -> tuple[str, str, str | None]:
    """(path, query, fragment) of a request-target; fragment None when it has none."""
    rest, hashed, fragment = target.partition("#")
    path, _, query = rest.partition("?")
    return path, query, fragment if hashed else None


@dataclass(frozen=True)
class Terms:
    """What the daemon is at the moment of the handshake."""

    accepting: bool
    full: bool
    allowed_origins: Iterable[str]
    #: Checks client tokens; None: anyone may connect.
    tokens: TokenVerifier | None = None
    #: Unix time, for the token's exp and nbf.
    now: float = 0.0
    #: channels.max_per_connection, and what a client without a token may do.
    max_channels: int = 100
    rights: ChannelRights = ChannelRights()


_RETRY = (("Retry-After", "1"),)
_CHALLENGE = (("WWW-Authenticate", 'Bearer realm="ebbcast"'),)


def match_path(path: str, ws_path: str) -> tuple[bool, str | None]:
    """Whether ``path`` (without its query) is the WebSocket endpoint, and the
    client id it names (None: the server picks one; "" is not valid)."""
    if path == ws_path:
        return True, None
    if path.startswith(ws_path) and path[len(ws_path):len(ws_path) + 1] == "/":
        return True, path[len(ws_path) + 1:]
    return False, None


def answer(request: Request, ws_path: str, terms: Terms) -> Acceptance | Refusal | None:
    """The answer to any request on the public listener, from either reader: None
    when it is not a handshake (see the module's rules)."""
    if request.size > MAX_HEADER_BLOCK:
        return Refusal(431, f"request headers over {MAX_HEADER_BLOCK} bytes\n")
    path, query, fragment = split_target(request.target)
    ours, client_id = match_path(path, ws_path)
    if not ours or request.method != "GET":
        return None
    if fragment is not None:
        return Refusal(400, "a handshake's target has no #fragment\n")
    if request.version != "HTTP/1.1":
        return Refusal(400, "a handshake is an HTTP/1.1 request\n")
    if request.hosts != 1:
        return Refusal(400, "a handshake has one Host header\n")
    if request.body:
        return Refusal(400, "a handshake has no body\n")
    return decide(client_id, query, request.headers, terms)


def decide(client_id: str | None, query: str, headers: Mapping[str, str],
           terms: Terms) -> Acceptance | Refusal:
    """The answer to a well-formed GET on the WebSocket endpoint (see the module's
    rules).

    ``headers`` is looked up by lower-case names: a Tornado ``HTTPHeaders`` (any
    case works) or the dict of :func:`read_upgrade`."""
    if client_id is not None and not _CLIENT_ID.fullmatch(client_id):
        return Refusal(400, "invalid client id: use 1 to 64 of A-Z a-z 0-9 _ . ~ -\n",
                       "client_id")
    if client_id == ADMIN_SENDER:
        return Refusal(400, "invalid client id: admin is reserved\n", "client_id")
    if not terms.accepting:
        return Refusal(503, "server is draining", "draining", _RETRY)
    if terms.full:
        return Refusal(503, "too many connections", "max_connections", _RETRY)
    arguments = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
    resume = None
    since = arguments.get("since")
    if since is not None:
        since = since.strip()
        if not since.isascii() or not since.isdigit() or len(since) > _LONGEST_OFFSET:
            return Refusal(400, "invalid since: an offset from a welcome or message frame\n")
        resume = Resume(int(since), arguments.get("epoch", "").strip())
    if headers.get("upgrade", "").lower() != "websocket":
        return Refusal(400, 'Can "Upgrade" only to "WebSocket".')
    if "upgrade" not in (s.strip().lower() for s in headers.get("connection", "").split(",")):
        return Refusal(400, '"Connection" must be "Upgrade".')
    if not origin_allowed(headers, terms.allowed_origins):
        return Refusal(403, "Cross origin websockets not allowed", "origin")
    if headers.get("sec-websocket-version") != "13":
        return Refusal(426, "WebSocket version 13 only",
                       headers=(("Sec-WebSocket-Version", "13"),))
    key = headers.get("sec-websocket-key", "")
    if not headers.get("host") or not valid_key(key):
        return Refusal(400, "Missing/Invalid WebSocket headers")
    grant = None
    if terms.tokens is not None:
        token = bearer_token(headers.get("authorization"), arguments.get("token"))
        answer = terms.tokens.verify(token, terms.now)
        if isinstance(answer, Denial):
            return Refusal(401, f"unauthorized: {answer.reason}\n", "auth", _CHALLENGE)
        if answer.client_id is not None:
            if answer.client_id == ADMIN_SENDER:
                return Refusal(401, "unauthorized: a token may not name the client admin\n",
                               "auth", _CHALLENGE)
            if client_id is not None and client_id != answer.client_id:
                return Refusal(401, "unauthorized: the token is for another client id\n",
                               "auth", _CHALLENGE)
            client_id = answer.client_id
        grant = answer
    channels = read_channels(arguments.get("channels", ""), terms.max_channels,
                             grant.rights if grant is not None else terms.rights)
    if isinstance(channels, Refusal):
        return channels
    return Acceptance(client_id, resume, switching_protocols(key), grant, channels)


def read_channels(listed: str, limit: int, rights: ChannelRights
                  ) -> tuple[str, ...] | Refusal:
    """The channels of ``?channels=a,b`` (each once, in order), or the refusal
    naming the first that cannot be subscribed to."""
    channels = tuple(dict.fromkeys(name for name in listed.split(",") if name)) \
        if listed else ()
    for index, channel in enumerate(channels):
        if not valid_channel(channel):
            return Refusal(400, f"invalid channel: {channel[:128]!r} (1 to 128 of "
                                "A-Z a-z 0-9 _ . : @ -)\n")
        if index >= limit:
            return Refusal(400, f"too many channels: {channel} is one more than "
                                f"channels.max_per_connection ({limit})\n")
        if not rights.subscribe.allow(channel):
            return Refusal(403, f"forbidden channel: {channel}\n")
    return channels


def origin_allowed(headers: Mapping[str, str], allowed: Iterable[str]) -> bool:
    """Whether a handshake's origin is served (see the module's rules)."""
    site = headers.get("sec-fetch-site")
    if site in ("same-origin", "none"):
        return True
    origin = headers.get("origin")
    if origin is None:
        return site is None  # not a browser; a browser naming no origin is refused
    host = headers.get("host", "").lower()
    if host and urlsplit(origin).netloc.lower() == host:
        return True
    wanted = origin.lower().rstrip("/")
    return any(a == "*" or a.lower() == wanted for a in allowed)


def valid_key(key: str) -> bool:
    """A Sec-WebSocket-Key is 16 bytes in base64 (RFC 6455 section 4.1)."""
    if len(key) != 24:
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def accept_value(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode()


def switching_protocols(key: str) -> bytes:
    """The whole 101 response: no subprotocol, no extension."""
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
            + accept_value(key).encode() + b"\r\n\r\n")


@dataclass(frozen=True)
class UpgradeRequest:
    """A complete request that asks to upgrade, read by :func:`read_upgrade`."""

    request: Request
    #: Bytes up to and including the blank line that ends the headers.
    length: int


class _Collector:
    __slots__ = ("url", "fields")

    def __init__(self) -> None:
        self.url = b""
        self.fields: list[tuple[str, str]] = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # as Tornado's reader has them: latin-1, the value without surrounding blanks
        self.fields.append((name.decode("latin-1"), value.decode("latin-1").strip(" \t")))


def read_upgrade(data: bytes) -> UpgradeRequest | None:
    """The request at the start of ``data``, parsed by httptools (the C parser
    uvicorn uses), when it is complete and asks to upgrade; None for anything else
    (incomplete, no upgrade asked, malformed): Tornado's HTTP/1 reader then takes
    it. What the request may be is :func:`answer`'s to say, for both readers."""
    collector = _Collector()
    parser = httptools.HttpRequestParser(collector)
    try:
        parser.feed_data(data)
        return None  # no upgrade asked, or not complete
    except httptools.HttpParserUpgrade as upgrade:
        length = int(upgrade.args[0])
    except httptools.HttpParserError:
        return None
    method = parser.get_method().decode("latin-1")
    target = collector.url.decode("latin-1")
    version = f"HTTP/{parser.get_http_version()}"
    if _request_line(data) != f"{method} {target} {version}".encode("latin-1"):
        return None  # spaced otherwise than by one space each: Tornado's reader refuses it
    return UpgradeRequest(request(method, target, version, collector.fields), length)


def _request_line(data: bytes) -> bytes:
    """The request line as sent (blank lines before it skipped, as Tornado does)."""
    return data.lstrip(b"\r\n").split(b"\n", 1)[0].removesuffix(b"\r")


def request(method: str, target: str, version: str,
            fields: Iterable[tuple[str, str]]) -> Request:
    """A :class:`Request` from its line and its header fields in the order sent."""
    fields = list(fields)
    headers: dict[str, str] = {}
    for name, value in fields:
        key = name.lower()
        headers[key] = value if key not in headers else f"{headers[key]},{value}"
    return Request(method, target, version, headers,
                   hosts=sum(1 for name, _ in fields if name.lower() == "host"),
                   body="content-length" in headers or "transfer-encoding" in headers,
                   size=header_block_size(f"{method} {target} {version}", fields))
