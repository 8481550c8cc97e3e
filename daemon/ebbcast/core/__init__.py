"""Shared by every process: the state machine, typed events, metrics, logs,
sockets and the protocol's frames. Imports nothing above it (only ``ebbcast.config``)."""
