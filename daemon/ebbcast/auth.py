"""Kept for upgrades from 0.1.0 only: its main process, which keeps running its own
code through an upgrade, imports ``load_public_key`` from here when a reload or an
upgrade first checks ``auth.jwt_public_key_file``. The loader is
``ebbcast.values.load_public_key``; this module goes in the release after next."""

from ebbcast.values import load_public_key

__all__ = ["load_public_key"]
