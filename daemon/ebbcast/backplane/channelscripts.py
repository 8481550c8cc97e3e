"""The Lua scripts of channels on Redis (``ebbcast.backplane.redischannels``), and
how their answers are read.

KEYS of both scripts: ``RedisNames.channel_keys``. A channel's epoch is made anew
(its counter and history cleared) when missing or made on a master of another
replication id, as the global stream's is (``ebbcast.backplane.redis``); every key
of a channel expires ``keep`` milliseconds after its last use.
"""

from __future__ import annotations

import json
from typing import Any

from ebbcast.backplane.channels import Answer, Ask
from ebbcast.backplane.redis import ENSURE_EPOCH

#: ARGV[1]: a new epoch, ARGV[2]: the keys' TTL (``keep``, ms).
_ENSURE_EPOCH = ENSURE_EPOCH + """
local keep = tonumber(ARGV[2])
"""
#: ARGV: new epoch, keep ms, history size, frame, max channels, channel, key base, topic.
SEQUENCE_SCRIPT = _ENSURE_EPOCH + r"""
local offset = redis.call('INCR', KEYS[2])
local frame = string.sub(ARGV[4], 1, -2) .. ',"offset":' .. offset .. '}'
local now = redis.call('TIME')
if tonumber(ARGV[3]) > 0 then
  redis.call('XADD', KEYS[3], 'MAXLEN', tonumber(ARGV[3]), '0-' .. offset, 'f', frame,
             't', now[1] .. '.' .. string.format('%06d', tonumber(now[2])))
end
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], keep) end
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[5], ms, ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', ms - keep)
local extra = redis.call('ZCARD', KEYS[5]) - tonumber(ARGV[5])
if extra > 0 then
  local old = redis.call('ZPOPMIN', KEYS[5], extra)
  for i = 1, #old, 2 do
    local base = ARGV[7] .. old[i] .. '/'
    redis.call('DEL', base .. 'epoch', base .. 'offset', base .. 'history',
               base .. 'epoch:replid')
  end
end
redis.call('PUBLISH', ARGV[8], 'm\n' .. epoch .. '\n' .. offset .. '\n' .. frame)
return offset
"""
#: ARGV: new epoch, keep ms, since (-1: no resume), and optionally the epoch of
#: ``since``: when that is not the channel's epoch, entries are read from its first
#: offset (what the new epoch kept). Returns {epoch, latest, entries}.
POSITION_SCRIPT = _ENSURE_EPOCH + """
redis.call('PEXPIRE', KEYS[1], keep)
redis.call('PEXPIRE', KEYS[4], keep)
local latest = tonumber(redis.call('GET', KEYS[2]) or '0')
local since = tonumber(ARGV[3])
if since > 0 and ARGV[4] and ARGV[4] ~= '' and ARGV[4] ~= epoch then since = 0 end
local entries = {}
if since >= 0 and since < latest then
  entries = redis.call('XRANGE', KEYS[3], '0-' .. (since + 1), '+')
end
return {epoch, latest, entries}
"""


def answer_from(ask: Ask, epoch: str, latest: int, entries: Any, size: int, ttl: float,
                now: float) -> Answer:
    """The answer to ``ask`` from the position script's result: the position, and
    for a resume, whether every message after ``since`` is kept (``size`` and
    ``ttl`` are history.*) and which; ``now`` is unix time."""
    resume = ask.resume
    if resume is None:
        return Answer(ask.request, ask.channel, epoch, latest)
    fresh = _fresh(entries, ttl, now)
    recovered = resume.epoch == epoch and resume.since <= latest and size > 0 and (
        resume.since == latest or (bool(fresh) and fresh[0][0] == resume.since + 1
                                   and fresh[-1][0] == latest))
    return Answer(ask.request, ask.channel, epoch, latest, recovered,
                  tuple(frame for _, frame in fresh) if recovered else ())


def _fresh(entries: Any, ttl: float, now: float) -> list[tuple[int, str]]:
    """The entries of the position script's result younger than ``ttl``, as
    (offset, frame), in order."""
    fresh = []
    for entry_id, flat in entries:  # a script answers XRANGE's fields as a flat list
        fields = dict(zip(flat[::2], flat[1::2]))
        if ttl <= 0 or now - float(fields[b"t"]) <= ttl:
            fresh.append((int(entry_id.split(b"-")[1]), fields[b"f"].decode()))
    return fresh


def kept_run(entries: Any, latest: int, ttl: float, now: float) -> list[tuple[int, str]]:
    """The messages still kept without a gap up to ``latest``, as (offset, frame):
    what subscribers can still be given once they are told that the ones before
    were lost."""
    run: list[tuple[int, str]] = []
    for offset, frame in reversed(_fresh(entries, ttl, now)):
        if offset != latest - len(run):
            break
        run.append((offset, frame))
    return run[::-1]


def channel_epoch(channel: str, epoch: str, offset: int) -> str:
    """A channel's history was lost: its messages go on after ``offset`` in ``epoch``."""
    return json.dumps({"type": "epoch", "channel": channel, "epoch": epoch, "offset": offset},
                      separators=(",", ":"))
