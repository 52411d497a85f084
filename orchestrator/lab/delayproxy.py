"""A TCP proxy that adds latency: every chunk is forwarded delay/2 after it arrived, each way.

This kernel has no netem, so a `slow` lab host gets this proxy inside its network
namespace (ADDRESS:2222 → ADDRESS:22). Chunks keep their order and reading never waits on
the delay, so the proxy adds latency without cutting bandwidth: a request and its reply
take `--delay-ms` longer.

    python -m orchestrator.lab.delayproxy --listen A:2222 --connect A:22 --delay-ms 100
"""

from __future__ import annotations

import argparse
import asyncio


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    sender = asyncio.create_task(deliver())
    try:
        while data := await reader.read(65536):
            queue.put_nowait((loop.time() + delay, data))
    except ConnectionError:
        pass
    queue.put_nowait((loop.time() + delay, b""))
    try:
        await sender
    except ConnectionError:
        pass


async def _serve(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            s_reader, s_writer = await asyncio.open_connection(*target)
        except OSError:
            c_writer.close()
            return
        await asyncio.gather(
            _pipe(c_reader, s_writer, delay),
            _pipe(s_reader, c_writer, delay),
            return_exceptions=True,
        )
        for w in (c_writer, s_writer):
            w.close()

    server = await asyncio.start_server(handle, *listen, reuse_address=True)
    async with server:
        await server.serve_forever()


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", type=_addr, required=True)
    parser.add_argument("--connect", type=_addr, required=True)
    parser.add_argument("--delay-ms", type=float, required=True, help="added round-trip time")
    args = parser.parse_args()
    asyncio.run(_serve(args.listen, args.connect, args.delay_ms / 2000))


if __name__ == "__main__":
    main()
