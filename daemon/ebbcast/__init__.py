"""ebbcast: a WebSocket broadcast daemon that drains gracefully."""

__version__ = "0.1.0"
