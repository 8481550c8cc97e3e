"""Kept for upgrades from 0.1.0 only: its main process, which keeps running its own
code through an upgrade, imports ``parse_network`` from here when a reload or an
upgrade first checks ``server.trusted_proxies``. The parser is
``ebbcast.values.parse_network``; this module goes in the release after next."""

from ebbcast.values import parse_network

__all__ = ["parse_network"]
