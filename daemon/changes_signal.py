"""The highest committed change position, published on the event loop after each commit.

The writer publishes it when it resolves a commit (``Writer._resolve``, on the loop), and so does an
erasure once its job has committed. Long-polls of the feed, its streams and the outbound sender wait on
it instead of polling the database. Commits made by another process (the CLI's replay, reconcile,
delete) do not reach it: whoever waits must also read the table again now and then (``wait_beyond``'s
timeout).

``close`` (the server is stopping) wakes every waiter for good: a long-poll answers with what it has
and a stream ends, so that open ones do not hold the shutdown up.
"""

from __future__ import annotations

import anyio


class ChangesSignal:
    def __init__(self, latest: int = 0) -> None:
        self.latest = latest
        self.closed = False
        # Created on first wait, on the loop; replaced by each publish that moves ``latest``, so that
        # every waiter of the old one wakes once.
        self._moved: anyio.Event | None = None

    @property
    def awaited(self) -> bool:
        """Someone has waited since the last move (a test waits for a long-poll to be in place)."""
        return self._moved is not None

    def publish(self, position: int | None) -> None:
        """A commit made ``position`` the highest one (on the event loop; None: it recorded nothing)."""
        if position is None or position <= self.latest:
            return
        self.latest = position
        self._wake()

    def close(self) -> None:
        """The server is stopping (on the event loop): wake every waiter now, and every later one at once."""
        self.closed = True
        self._wake()

    async def wait_beyond(self, position: int, timeout: float) -> int:  # noqa: ASYNC109 (a timeout is an answer here)
        """The latest position, as soon as it is past ``position`` (or the signal is closed), or when
        ``timeout`` seconds are up."""
        with anyio.move_on_after(timeout):
            while self.latest <= position and not self.closed:
                if self._moved is None:
                    self._moved = anyio.Event()
                await self._moved.wait()
        return self.latest

    def _wake(self) -> None:
        moved, self._moved = self._moved, None
        if moved is not None:
            moved.set()
