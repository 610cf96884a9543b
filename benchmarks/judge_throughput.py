"""Judge throughput: does the OpenAI-compatible backend keep a server busy?

A local OpenAI-compatible server (tests/openai_server.py, in its own process like a real server)
answers every request after a fixed latency of 100 ms. With at most 32 requests in flight its
capacity is 32 / 0.1 s = 320 requests/s; the backend (``OpenAIChat.chat`` on one batch) should
reach at least 90% of it. Side by side, in the same run, a minimal raw-socket HTTP client with 32
keep-alive connections shows what the server and the machine allow at all, so a low ratio can be
told apart from a busy machine.

    python benchmarks/judge_throughput.py [requests] [concurrency] [latency_s]

Prints the rates and their ratios to capacity (target >= 0.9); it does not assert.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from openai_server import OpenAIServer  # noqa: E402


def _answer(request: dict) -> str:
    return "5\nA fine answer."


def _serve(latency_s: float, urls: mp.Queue, stop: mp.Event) -> None:
    with OpenAIServer(_answer, latency_s=latency_s) as server:
        urls.put(server.url)
        stop.wait()


async def _raw_client(url: str, requests: int, concurrency: int) -> float:
    """Requests/s of bare HTTP/1.1 over ``concurrency`` keep-alive sockets (no JSON parsing)."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    body = json.dumps({"model": "raw", "messages": [{"role": "user", "content": "Rate this."}]}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def connection(n: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        for _ in range(n):
            writer.write(request)
            await writer.drain()
            head = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
            length = int(head.split("content-length:")[1].split("\r\n")[0])
            await reader.readexactly(length)
        writer.close()

    began = time.perf_counter()
    await asyncio.gather(*(connection(requests // concurrency) for _ in range(concurrency)))
    return (requests // concurrency * concurrency) / (time.perf_counter() - began)


def main(requests: int = 1280, concurrency: int = 32, latency_s: float = 0.1) -> None:
    from sft_select.tasks.backends.chat import OpenAIChat

    ctx = mp.get_context("spawn")
    urls, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve, args=(latency_s, urls, stop), daemon=True)
    server.start()
    url = urls.get(timeout=60)
    capacity = concurrency / latency_s
    conversations = [[{"role": "user", "content": f"Rate example {i}."}] for i in range(requests)]
    try:
        llm = OpenAIChat("bench-judge", base_url=url, api_key="sk-bench", max_concurrency=concurrency)
        llm.chat(conversations[:concurrency])  # warm up: imports, client, connections
        began, cpu = time.perf_counter(), time.process_time()
        results = llm.chat(conversations)
        elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
        llm.close()
        raw = asyncio.run(_raw_client(url, requests, concurrency))
    finally:
        stop.set()
        server.join(timeout=10)
    achieved = requests / elapsed
    errors = sum(r.error is not None for r in results)
    print(f"{requests} requests, concurrency {concurrency}, server latency {latency_s * 1000:.0f} ms, "
          f"capacity {capacity:.0f} requests/s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"OpenAIChat.chat    {achieved:7.1f} requests/s  ratio {achieved / capacity:.3f} (target >= 0.9)  "
          f"{errors} errors, client CPU {1000 * cpu / requests:.2f} ms/request")
    print(f"raw HTTP reference {raw:7.1f} requests/s  ratio {raw / capacity:.3f}")


if __name__ == "__main__":
    main(*(float(a) if "." in a else int(a) for a in sys.argv[1:]))
