"""Logging to stderr as text lines or JSON objects (one per line)."""

from __future__ import annotations

import json
import logging
import sys
import time

from tornado.web import RequestHandler

log = logging.getLogger(__name__)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
#: Tornado logs every HTTP request, and every malformed one, at INFO; ebbcast keeps
#: INFO for lifecycle events, so a stranger's requests cannot write INFO lines.
_QUIET_LOGGERS = ("tornado.access", "tornado.general")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (unix seconds), level, logger, msg, pid."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, fmt: str) -> None:
    """Send every log record at ``level`` or above to stderr, replacing any setup."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    """Apply a level name ("debug".."error") to the root logger."""
    numeric = getattr(logging, level.upper())
    logging.getLogger().setLevel(numeric)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))


def log_request(handler: RequestHandler) -> None:
    """Access log at DEBUG (scrapes and page loads are not lifecycle events)."""
    request = handler.request
    # the path only: a query may hold a client's token
    log.debug("%s %s %s %d %.1fms", request.remote_ip, request.method, request.path,
              handler.get_status(), 1000.0 * request.request_time())
