"""How broadcasts reach other processes and hosts: the in-memory, relay and Redis
backplanes, offsets, history and the sequencer."""
