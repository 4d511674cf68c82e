"""Bull Board shows the runner's work as an operator sees it: a real browser on the real board.

A real runner processes a job that Node added; ``scripts/bull-board/server.js`` serves the board
on that queue; headless Chromium (Debian's package, installed by ``scripts/browser-deps`` when
missing) is driven over the Chrome DevTools Protocol with aiohttp's websocket client. The test
reads what the page shows: the job's progress, its log lines, the worker that processed it, and
the runner's worker among the queue's connected workers. The board's JSON API is checked first,
so that a failure says whether the data or the page is wrong.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import msgspec
import pytest
from sample_api import SampleApi

from runner.credentials import seal
from tests.conftest import ROOT, b64key, node_peer
from tests.workflows import job_data, three_step_version

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
BULL_BOARD = ROOT / "scripts" / "bull-board" / "server.js"
API_KEY = "k-bull-board-0001"
STEPS = ("fetch_customer", "create_ticket", "get_ticket")


class DevTools:
    """A minimal Chrome DevTools Protocol client over one browser websocket (flat sessions)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._waiters: dict[tuple[str, str | None], list[asyncio.Future[dict[str, Any]]]] = {}
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._calls.pop(data["id"], None)
                if fut is None or fut.done():
                    continue
                if "error" in data:
                    fut.set_exception(RuntimeError(f"CDP error: {data['error']}"))
                else:
                    fut.set_result(data.get("result", {}))
            else:
                key = (data["method"], data.get("sessionId"))
                for fut in self._waiters.pop(key, []):
                    if not fut.done():
                        fut.set_result(data.get("params", {}))
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(ConnectionError("DevTools connection closed"))

    async def call(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        call_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        await self._ws.send_str(json.dumps(message))
        return await asyncio.wait_for(fut, 15)

    def expect(self, method: str, session: str | None = None) -> asyncio.Future[dict[str, Any]]:
        """A future for the next ``method`` event; take it before the call that causes it."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault((method, session), []).append(fut)
        return fut

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


# Resolves true once every text is on the page, false after the timeout: the browser tells us
# when the DOM changes, so the test waits on the render itself rather than on a clock.
WAIT_FOR_TEXTS_JS = """
(texts, scope, timeoutMs) => new Promise((resolve) => {
  const shown = () => document.querySelector(scope)?.innerText ?? '';
  const missing = () => texts.filter((t) => !shown().includes(t));
  if (missing().length === 0) return resolve([]);
  const observer = new MutationObserver(() => {
    if (missing().length === 0) { observer.disconnect(); clearTimeout(timer); resolve([]); }
  });
  observer.observe(document, {subtree: true, childList: true, characterData: true});
  const timer = setTimeout(() => { observer.disconnect(); resolve(missing()); }, timeoutMs);
})
"""

# Clicks the innermost visible control whose text or aria-label is exactly the label.
CLICK_JS = """
(label) => {
  const candidates = [...document.querySelectorAll('button, a, [role="tab"], [role="button"], li')]
    .filter((el) => el.offsetParent !== null
      && (el.innerText.trim() === label || el.getAttribute('aria-label') === label
        || el.getAttribute('title') === label));
  const target = candidates[candidates.length - 1];
  if (!target) return false;
  target.click();
  return true;
}
"""


class Page:
    """One browser tab: navigate, wait for text, click, read, screenshot."""

    def __init__(self, devtools: DevTools, session: str) -> None:
        self._dt = devtools
        self._session = session

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._dt.call(method, params, self._session)

    async def goto(self, url: str) -> None:
        loaded = self._dt.expect("Page.loadEventFired", self._session)
        result = await self.call("Page.navigate", {"url": url})
        assert "errorText" not in result, f"navigation to {url} failed: {result}"
        await asyncio.wait_for(loaded, 15)

    async def evaluate(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def text(self) -> str:
        return str(await self.evaluate("document.body.innerText"))

    async def wait_for_texts(self, *texts: str, scope: str = "body", timeout_ms: int = 8000) -> str:
        """Wait until every text is shown inside ``scope`` (a CSS selector); returns the page."""
        args = f"{json.dumps(texts)}, {json.dumps(scope)}, {timeout_ms}"
        missing = await self.evaluate(f"({WAIT_FOR_TEXTS_JS})({args})")
        body = await self.text()
        assert missing == [], f"{scope} never showed {missing}; the page shows:\n{body}"
        return body

    async def click(self, label: str) -> None:
        clicked = await self.evaluate(f"({CLICK_JS})({json.dumps(label)})")
        assert clicked, (
            f"no visible control labelled {label!r}; the page shows:\n{await self.text()}"
        )

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", {"format": "png"})
        path.write_bytes(base64.b64decode(shot["data"]))


def ensure_chromium() -> None:
    """Install Debian's chromium when it is missing: the browser test never skips."""
    if not CHROMIUM.exists():
        subprocess.run([str(ROOT / "scripts" / "browser-deps")], check=True, timeout=600)
    assert CHROMIUM.exists(), "scripts/browser-deps did not install /usr/bin/chromium"


async def _read_until(
    stream: asyncio.StreamReader, pattern: re.Pattern[str], seen: list[str], timeout_s: float
) -> re.Match[str]:
    async def scan() -> re.Match[str]:
        while line := await stream.readline():
            text = line.decode(errors="replace")
            seen.append(text)
            if match := pattern.search(text):
                return match
        raise AssertionError("process ended before printing " + pattern.pattern)

    return await asyncio.wait_for(scan(), timeout_s)


async def _drain(stream: asyncio.StreamReader, seen: list[str]) -> None:
    # Keep reading so that a chatty child never blocks on a full pipe.
    while line := await stream.readline():
        seen.append(line.decode(errors="replace"))


async def _stop(proc: asyncio.subprocess.Process, drain: asyncio.Future[None] | None) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            # Each child runs in its own process group: this reaches its helpers and nothing else.
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    if drain is not None:
        # A helper that outlived its parent may still hold the pipe open: do not wait on it.
        try:
            await asyncio.wait_for(drain, 5)
        except TimeoutError:
            pass


@contextlib.asynccontextmanager
async def bull_board(queue: str) -> AsyncIterator[str]:
    """``node scripts/bull-board/server.js`` on a free port; yields its base URL."""
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(BULL_BOARD),
        env={**os.environ, "QUEUE_NAMES": queue, "PORT": "0", "HOST": "127.0.0.1"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    drain = None
    try:
        try:
            match = await _read_until(
                proc.stdout, re.compile(r"bull-board: (http://\S+?)/? "), seen, 20
            )
        except (AssertionError, TimeoutError) as err:
            raise AssertionError(f"bull-board did not start: {''.join(seen)}") from err
        drain = asyncio.ensure_future(_drain(proc.stdout, seen))
        yield match.group(1)
    finally:
        await _stop(proc, drain)


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[Page]:
    """Headless Chromium with a throwaway profile; yields one page attached over DevTools."""
    ensure_chromium()
    proc = await asyncio.create_subprocess_exec(
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stderr is not None
    seen: list[str] = []
    drain = None
    try:
        try:
            match = await _read_until(
                proc.stderr, re.compile(r"DevTools listening on (ws://\S+)"), seen, 30
            )
        except (AssertionError, TimeoutError) as err:
            raise AssertionError(f"chromium did not start: {''.join(seen)}") from err
        drain = asyncio.ensure_future(_drain(proc.stderr, seen))
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(match.group(1), max_msg_size=0)
            devtools = DevTools(ws)
            try:
                target = await devtools.call("Target.createTarget", {"url": "about:blank"})
                attached = await devtools.call(
                    "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
                )
                page = Page(devtools, attached["sessionId"])
                await page.call("Page.enable")
                await page.call("Runtime.enable")
                await page.call(
                    "Emulation.setDeviceMetricsOverride",
                    {"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": False},
                )
                yield page
            finally:
                with contextlib.suppress(Exception):
                    await devtools.call("Browser.close")
                await devtools.close()
    finally:
        await _stop(proc, drain)


def sealed_for(run_id: str, key: bytes, api_key: str) -> str:
    conn = {"id": "conn_api", "type": "API_KEY", "config": {}, "secrets": {"apiKey": api_key}}
    creds = {"connections": {"conn_api": conn}, "secrets": {}}
    return seal(msgspec.json.encode(creds), key, run_id)


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as response:
        assert response.status == 200, f"GET {url}: {response.status} {await response.text()}"
        return await response.json()


async def test_bull_board_shows_the_runners_job_progress_logs_and_worker(
    serve: Any, runner_process: Any, clean_queue: str, credentials_key: bytes, tmp_path: Path
) -> None:
    # Given a runner with a name an operator would recognise has run one workflow to success
    # and one into an API that refuses its key
    worker_name = f"runner-e2e-{uuid.uuid4().hex[:6]}"
    api = SampleApi(API_KEY)
    base = await serve(api.app())
    await runner_process(
        RUNNER_CREDENTIALS_KEY=b64key(credentials_key), RUNNER_WORKER_NAME=worker_name
    )
    ok_id, failed_id = "run_board_ok", "run_board_refused"
    jobs = [
        {
            "data": job_data(
                run_id,
                three_step_version(base),
                sealedCredentials=sealed_for(run_id, credentials_key, key),
            ),
            "opts": {"jobId": run_id},
        }
        for run_id, key in ((ok_id, API_KEY), (failed_id, "k-wrong"))
    ]
    report = await node_peer("run", {"queue": clean_queue, "jobs": jobs})
    assert report["jobs"][ok_id]["state"] == "completed", report["jobs"][ok_id]
    assert report["jobs"][failed_id]["state"] == "failed", report["jobs"][failed_id]
    failed_reason = report["jobs"][failed_id]["failedReason"]
    assert failed_reason.startswith("HTTP_ERROR: "), failed_reason

    async with bull_board(clean_queue) as board, aiohttp.ClientSession() as http:
        # Then the board's API has the job's progress, logs and worker
        listing = await get_json(
            http, f"{board}/api/queues?activeQueue={clean_queue}&status=completed&page=1"
        )
        (queue,) = [q for q in listing["queues"] if q["name"] == clean_queue]
        (listed,) = [j for j in queue["jobs"] if j["id"] == ok_id]
        assert listed["processedBy"] == worker_name, listed
        assert listed["progress"] == {
            "progress": 100,
            "stepKey": "get_ticket",
            "status": "SUCCESS",
            "completedSteps": 3,
            "totalSteps": 3,
        }
        assert listed["returnValue"]["status"] == "SUCCESS", listed
        logs = await get_json(http, f"{board}/api/queues/{clean_queue}/{ok_id}/logs")
        assert any("fetch_customer SUCCESS" in line for line in logs), logs
        workers = await get_json(http, f"{board}/api/queues/{clean_queue}/workers")
        assert worker_name in {w["name"] for w in workers["workers"]}, workers

        # and a person who opens the job's page in a browser sees who ran it
        async with chromium(tmp_path / "profile") as page:
            await page.goto(f"{board}/queue/{clean_queue}/{ok_id}")
            await page.wait_for_texts(ok_id, "Process started at", f"by {worker_name}", "100%")
            await page.screenshot(tmp_path / "job-data.png")

            # its progress,
            assert "completedSteps" not in await page.text()
            await page.click("Progress")
            await page.wait_for_texts('stepKey:"get_ticket"', "completedSteps:3", "totalSteps:3")
            await page.screenshot(tmp_path / "job-progress.png")

            # its log lines, one per transition,
            assert "fetch_customer SUCCESS" not in await page.text()
            await page.click("Logs")
            body = await page.wait_for_texts(
                *(f"{step} SUCCESS" for step in STEPS), "fetch_customer RUNNING attempt 1"
            )
            assert API_KEY not in body
            await page.screenshot(tmp_path / "job-logs.png")

            # and the runner among the queue's connected workers
            await page.click("Queue info")
            await page.wait_for_texts("Connected workers", scope='[role="dialog"]')
            await page.click("Connected workers")
            await page.wait_for_texts(worker_name, "connected", scope='[role="dialog"]')
            await page.screenshot(tmp_path / "queue-workers.png")

            # and the failed run's page says why it failed, and at which step
            await page.goto(f"{board}/queue/{clean_queue}/{failed_id}")
            await page.wait_for_texts(failed_id, "Failed at", f"by {worker_name}")
            await page.click("Error")
            await page.wait_for_texts(failed_reason)
            await page.screenshot(tmp_path / "failed-error.png")
            await page.click("Logs")
            await page.wait_for_texts(
                "fetch_customer FAILED", "create_ticket CANCELED", "run FAILED"
            )
            await page.screenshot(tmp_path / "failed-logs.png")


async def test_bull_board_on_a_taken_port_says_so_in_one_line_and_exits_non_zero() -> None:
    # Given a port some other process listens on
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # When Bull Board is started on it
        proc = await asyncio.create_subprocess_exec(
            "node",
            str(BULL_BOARD),
            env={**os.environ, "QUEUE_NAMES": "q", "PORT": str(port), "HOST": "127.0.0.1"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    # Then it exits non-zero with one line that names the port, and no stack trace
    assert proc.returncode == 1
    assert out == b""
    assert err.decode().splitlines() == [
        f"bull-board: cannot listen on 127.0.0.1:{port}: port {port} is already in use "
        "(set PORT or HOST)"
    ]


@pytest.mark.xfail(
    strict=True,
    reason="lands with branch i22-queue (the runner's BullMQ worker metrics, issue 12)",
)
async def test_bull_board_metrics_view_shows_the_runners_throughput(
    serve: Any, runner_process: Any, clean_queue: str, tmp_path: Path
) -> None:
    # Given a runner has completed three runs and failed one
    async def ok(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"ok": True})

    async def gone(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({}, status=404)

    app = aiohttp.web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/gone", gone)
    base = await serve(app)
    await runner_process()

    def version(path: str) -> dict[str, Any]:
        action = {"id": "a", "method": "GET", "endpointTemplate": f"{base}{path}"}
        return {
            "id": f"wfv{path.replace('/', '_')}",
            "graph": {"steps": [{"key": "call", "actionId": "a"}]},
            "actions": {"a": {**action, "retryStrategy": "NONE"}},
        }

    jobs = [
        {"data": job_data(f"run_m_{n}", version(path)), "opts": {"jobId": f"run_m_{n}"}}
        for n, path in enumerate(["/ok", "/ok", "/ok", "/gone"])
    ]
    report = await node_peer("run", {"queue": clean_queue, "jobs": jobs})
    assert sorted(j["state"] for j in report["jobs"].values()) == ["completed"] * 3 + ["failed"]

    async with bull_board(clean_queue) as board, aiohttp.ClientSession() as http:
        # Then the board's metrics API counts them (BullMQ's worker metrics)
        metrics = await get_json(http, f"{board}/api/queues/{clean_queue}/metrics")
        assert (metrics["completed"] or {}).get("meta", {}).get("count") == 3, metrics
        assert (metrics["failed"] or {}).get("meta", {}).get("count") == 1, metrics

        # and the queue page's Metrics view shows the throughput, not "No metrics collected"
        async with chromium(tmp_path / "profile") as page:
            await page.goto(f"{board}/queue/{clean_queue}")
            # (expanded by default; its numbers arrive after the title)
            body = await page.wait_for_texts(
                "Throughput (jobs / min)", "Completed / min", "Failed / min"
            )
            assert "No metrics collected yet" not in body
            await page.screenshot(tmp_path / "queue-metrics.png")
