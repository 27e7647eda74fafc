"""Reconciles of one object coalesce: a bounded number run at once, one per object, and every request
that comes while an object's reconcile waits for a slot joins that one instead of queueing its own.

A level-triggered reconcile reads the whole state when it starts, so ten pod events of one FineTuneJob
that arrive while the operator is busy need one reconcile, not ten, and that one must read the state as
it is when it starts, not as it was when the first event came (a stale view would, say, create a Job
again that an earlier reconcile has made since). That is client-go's workqueue (a key is queued at most
once, and never handed to two workers at once), here on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable


class KeyedQueue:
    def __init__(self, workers: int):
        self.workers = workers
        self._slots: asyncio.Semaphore | None = None  # made on the loop that uses it
        self._waiting: dict[Hashable, asyncio.Future[None]] = {}  # requested, not started: joinable
        self._running: dict[Hashable, asyncio.Future[None]] = {}

    def pending(self) -> int:
        return len(self._waiting) + len(self._running)

    async def run(self, key: Hashable, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` for ``key`` once a slot is free and no earlier run of ``key`` is going, unless a run
        of ``key`` is already waiting: then wait for that one (its ``work``, which reads the state when it
        starts, serves this request too). Raises what that run raised."""
        future = self._waiting.get(key)
        if future is None:
            future = self._waiting[key] = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().create_task(self._start(key, future, work))
        await asyncio.shield(future)

    async def _start(self, key: Hashable, future: asyncio.Future[None], work: Callable[[], Awaitable[None]]) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.workers)
        try:
            earlier = self._running.get(key)
            if earlier is not None:
                await asyncio.wait([earlier])
            async with self._slots:
                del self._waiting[key]  # from here on, a new request queues a run after this one
                self._running[key] = future
                await work()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:  # handed to every request this run served
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waits any more
        else:
            future.set_result(None)
        finally:
            if self._waiting.get(key) is future:  # it failed or was cancelled before it started
                del self._waiting[key]
            if self._running.get(key) is future:
                del self._running[key]
