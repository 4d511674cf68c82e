"""The Python ceiling: the workload's HTTP calls only, in a plain aiohttp loop, no queue.

``python -m bench_lib.raw_loop --base-url U --workload w3|w1 --runs N --concurrency C
[--api-key K] [--uvloop]`` prints ``ready``, waits for a line on stdin, runs N workloads with
C in flight, then prints ``{"elapsed_s": ..., "failed": ...}``. The harness reads the process's
CPU time around that window.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from urllib.parse import quote

import aiohttp
import msgspec

_decode = msgspec.json.decode
_encode = msgspec.json.encode


async def _get(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> object:
    async with session.get(url, headers=headers) as resp:
        body = await resp.read()
        if resp.status >= 400:
            raise RuntimeError(f"{url} answered {resp.status}")
        return _decode(body)


async def _w3(
    session: aiohttp.ClientSession, base: str, i: int, auth: dict[str, str], w3: bool
) -> None:
    run_id = f"raw_{i}"
    customer: dict[str, str] = await _get(session, f"{base}/customers/{quote(f'c_{i}')}", auth)  # type: ignore[assignment]
    if not w3:
        return
    body = _encode(
        {
            "requester": customer["email"],
            "region": "eu",
            "subject": f"Order {i} for {customer['name']}",
            "priority": 2,
        }
    )
    headers = {
        **auth,
        "Content-Type": "application/json",
        "X-Region": "eu",
        "Idempotency-Key": f"{run_id}:create_ticket",
    }
    async with session.post(f"{base}/tickets", data=body, headers=headers) as resp:
        ticket = _decode(await resp.read())
        if resp.status >= 400:
            raise RuntimeError(f"POST /tickets answered {resp.status}")
    await _get(session, f"{base}/tickets/{quote(ticket['id'])}", auth)


async def main_async(args: argparse.Namespace) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    auth = {"X-API-Key": args.api_key} if args.api_key else {}
    w3 = args.workload == "w3"
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    todo = iter(range(args.runs))
    failed = 0

    async def lane() -> None:
        nonlocal failed
        for i in todo:
            try:
                await _w3(session, args.base_url, i, auth, w3)
            except Exception:
                failed += 1

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(args.concurrency)))
    elapsed_s = time.perf_counter() - started
    print(msgspec.json.encode({"elapsed_s": elapsed_s, "failed": failed}).decode(), flush=True)
    await session.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--workload", choices=("w3", "w1"), default="w3")
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--api-key", default="")
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop  # type: ignore[import-not-found]

        uvloop.run(main_async(args))
    else:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
