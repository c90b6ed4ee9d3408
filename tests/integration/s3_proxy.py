"""A TCP proxy in front of the S3 endpoint that turns slow, then silent (a test double for a
wedged endpoint or a congested link).

Bytes from the endpoint to its clients are forwarded at ``rate`` bytes/s per connection
until ``budget`` bytes have passed; after that every connection stays open and nothing more
is forwarded: requests are read and dropped, replies are withheld.
"""

from __future__ import annotations

import asyncio
import threading
from urllib.parse import urlsplit


class StallingProxy:
    def __init__(self, upstream: str, listen_host: str, *, budget: int, rate: float) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.listen_host = listen_host
        self.budget = budget
        self.rate = rate
        self.forwarded = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server

    @property
    def url(self) -> str:
        return f"http://{self.listen_host}:{self.port}"

    def __enter__(self) -> StallingProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._client, self.listen_host, 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _shutdown(self) -> None:
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        await asyncio.gather(
            self._pipe(reader, up_writer, throttle=False),
            self._pipe(up_reader, writer, throttle=True),
            return_exceptions=True,
        )
        for w in (writer, up_writer):
            w.transport.abort()

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, throttle: bool
    ) -> None:
        while data := await src.read(16384):
            if self.forwarded >= self.budget:
                continue  # silent: swallow everything, answer nothing
            if throttle:
                data = data[: self.budget - self.forwarded]
                self.forwarded += len(data)
                await asyncio.sleep(len(data) / self.rate)
            dst.write(data)
            await dst.drain()
