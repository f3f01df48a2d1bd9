"""A TCP proxy that adds a round-trip delay: each chunk is held rtt/2 in each direction, so a request and
its answer cost one rtt more, as on a link between sites (this kernel has no netem). Delay only, no
bandwidth limit: chunks in flight overlap, so a pipelined protocol hides the delay and a ping-pong one
pays it per exchange. Used by benchmarks/ssh_transfer.py.

    python -m tests.testbed.delay_proxy --target 127.0.0.1:PORT --rtt-ms 20   # prints "port N", runs
    with delay_proxy_process(target_port=PORT, rtt_s=0.02) as port: ...        # a proxy process
    async with DelayProxy(target_port=PORT, rtt_s=0.02) as proxy: proxy.port   # in this event loop
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from types import TracebackType
from typing import Any

CHUNK = 256 * 1024
# Chunks queued per direction before the reader waits (backpressure: at most ~64 MB held per direction).
QUEUE_CHUNKS = 256


class DelayProxy:
    """Listens on listen_host:port (0: a free one) and forwards every connection to the target, each
    chunk delayed rtt_s/2 per direction. An async context manager: leaving it closes every connection."""

    def __init__(
        self,
        *,
        target_port: int,
        rtt_s: float,
        target_host: str = "127.0.0.1",
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        if not 0 <= rtt_s <= 10:
            raise ValueError(f"rtt_s {rtt_s} outside 0..10 s")
        self.target = (target_host, target_port)
        self.listen = (listen_host, listen_port)
        self.one_way_s = rtt_s / 2
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("DelayProxy: not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._serve, *self.listen)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def serve_forever(self) -> None:
        if self._server is None:
            raise RuntimeError("DelayProxy: not started")
        await self._server.serve_forever()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                server_r, server_w = await asyncio.open_connection(*self.target)
            except OSError:
                client_w.close()
                return
            try:
                # A TaskGroup: when one direction fails (a reset), the other is cancelled with it.
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._pipe(client_r, server_w))
                    group.create_task(self._pipe(server_r, client_w))
            except* OSError:
                pass  # a peer went away: the connection ends, the proxy keeps serving others
            finally:
                for writer in (client_w, server_w):
                    writer.close()
        finally:
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One direction: a reader task stamps each chunk with its due time, a writer task sends it
        then; FIFO order keeps due times ascending, so waiting for the head never delays a later one."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)

        async def read() -> None:
            try:
                while chunk := await reader.read(CHUNK):
                    await queue.put((loop.time() + self.one_way_s, chunk))
            except ConnectionError:
                pass
            await queue.put((loop.time() + self.one_way_s, b""))  # EOF travels with the same delay

        async def write() -> None:
            while True:
                due, chunk = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)  # the delay itself, not a synchronisation
                if not chunk:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(chunk)
                await writer.drain()

        reading = asyncio.ensure_future(read())
        try:
            await write()
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await reading


@contextlib.contextmanager
def delay_proxy_process(
    *, target_port: int, rtt_s: float, target_host: str = "127.0.0.1", timeout_s: float = 30.0
) -> Iterator[int]:
    """A proxy in a process of its own (so it does not share the GIL with what it measures); yields
    its port, stops it on exit."""
    argv = [sys.executable, "-m", "tests.testbed.delay_proxy"]
    argv += ["--target", f"{target_host}:{target_port}", "--rtt-ms", str(rtt_s * 1000)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        # The first line is "port N", printed once the proxy listens; readline ends at EOF if it dies.
        line = _readline(proc, timeout_s=timeout_s)
        if not line.startswith("port "):
            raise RuntimeError(f"delay proxy did not start (exit {proc.poll()}): {line!r}")
        yield int(line.split()[1])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _readline(proc: subprocess.Popen[str], *, timeout_s: float) -> str:
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=timeout_s):
            raise RuntimeError(f"delay proxy: no port line within {timeout_s} s")
    return proc.stdout.readline().strip()


async def _main(target: str, rtt_ms: float, listen_port: int) -> None:
    host, _, port = target.rpartition(":")
    async with DelayProxy(target_host=host or "127.0.0.1", target_port=int(port), rtt_s=rtt_ms / 1000,
                          listen_port=listen_port) as proxy:  # fmt: skip
        print(f"port {proxy.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.testbed.delay_proxy", description=__doc__)
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="added round trip in milliseconds")
    parser.add_argument("--listen-port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    args = parser.parse_args(argv)
    asyncio.run(_main(args.target, args.rtt_ms, args.listen_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
