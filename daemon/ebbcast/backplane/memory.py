"""``memory://``: one instance, nothing leaves the process."""

from __future__ import annotations


class MemoryBackplane:
    """One instance: local delivery is all there is."""

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def publish(self, payload: str | bytes, source: str) -> None:
        pass

    def advertise(self, url: str | None) -> None:
        pass

    def peers(self) -> list[str]:
        return []
