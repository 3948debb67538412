"""A request queue that batches concurrent predictions: nothing is dropped, the model sees batches."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["Batcher", "QueueFull"]


class QueueFull(Exception):
    """The queue holds ``max_queue`` images already: the request is refused now (HTTP 503), not queued."""


class Batcher:
    """Collects images from concurrent requests into batches of at most ``max_batch`` and runs
    ``predict_fn`` on them in a worker thread, one batch at a time. A request that is queued is answered,
    never dropped; one that would take the queue over ``max_queue`` images is refused at once
    (:class:`QueueFull`). When a batch fails, its images are run one by one, so an image that breaks the
    model fails its own request and never its neighbours'.
    """

    def __init__(self, predict_fn: Callable[[Sequence[Any]], np.ndarray], max_batch: int = 16,
                 max_wait_s: float = 0.005, max_queue: int = 256) -> None:
        self.predict_fn, self.max_batch, self.max_wait_s = predict_fn, max_batch, max_wait_s
        self.max_queue = max_queue
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """End the batching loop and wait for it (the server's shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def submit(self, images: Sequence[Any]) -> np.ndarray:
        """Probabilities for ``images`` (queued behind earlier requests)."""
        if self._queue is None:
            await self.start()
        if self._queue.qsize() + len(images) > self.max_queue:  # type: ignore[union-attr]
            raise QueueFull(f"{self._queue.qsize()} images are waiting; the queue holds {self.max_queue}")  # type: ignore[union-attr]
        loop = asyncio.get_running_loop()
        futures = []
        for img in images:
            fut = loop.create_future()
            await self._queue.put((img, fut))  # type: ignore[union-attr]
            futures.append(fut)
        return np.stack(await asyncio.gather(*futures))

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            item = await self._queue.get()
            batch = [item]
            deadline = asyncio.get_running_loop().time() + self.max_wait_s
            while len(batch) < self.max_batch:
                timeout = deadline - asyncio.get_running_loop().time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            try:
                probs = await asyncio.to_thread(self.predict_fn, [img for img, _ in batch])
                for (_, fut), p in zip(batch, probs):
                    if not fut.done():
                        fut.set_result(p)
            except Exception:  # find the image that failed: each one alone
                for img, fut in batch:
                    try:
                        p = (await asyncio.to_thread(self.predict_fn, [img]))[0]
                        if not fut.done():
                            fut.set_result(p)
                    except Exception as exc:
                        if not fut.done():
                            fut.set_exception(exc)
