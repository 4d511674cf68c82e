"""What an API's answer says about its budget, read from its status and headers. Pure.

Read, in this order (names compared in lower case, as ``HttpResponse`` keeps them):

- ``Retry-After`` on a 429 or 503: pause the budget that long;
- the IETF draft's ``RateLimit-Remaining`` / ``RateLimit-Reset`` (delta seconds), its later
  structured form ``RateLimit: "policy";r=<remaining>;t=<reset>``, and the common
  ``X-RateLimit-Remaining`` / ``X-RateLimit-Reset`` (delta seconds, or epoch seconds as GitHub
  sends them): none left means pause until the reset; some left means at most ``remaining``
  requests until the reset, which lowers the budget when that is tighter than ours (for a
  reset at least ``PACE_MIN_RESET_MS`` away);
- a 429 that says none of this: back the budget off (``runner.flow.gcra``, AIMD).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from runner.retry import parse_retry_after_s

MAX_HINT_MS = 3_600_000
"""A server's pause or budget is believed for an hour at most (a typo'd epoch, a buggy API)."""
PACE_MIN_RESET_MS = 10_000
"""Some left lowers the budget to ``remaining`` per ``reset`` only for a reset this far off:
resets come in whole seconds, so for a short window the rounding would dominate (a 1 s window
with 2 left, its reset rounded up from 0.1 s, would space requests 500 ms apart). Short
windows are paused at 0 left instead."""
_EPOCH_S = 1_000_000_000  # a reset above this is an epoch time in seconds, not a delta
_STRUCTURED = re.compile(r"(?:^|;)\s*([rt])\s*=\s*(\d+)")


@dataclass(frozen=True, slots=True)
class BudgetHint:
    pause_ms: int = 0
    """Send nothing for this long (0: no pause)."""
    interval_ms: float = 0.0
    """At least this long between requests, for ``lasts_ms`` (0: no lower budget)."""
    lasts_ms: int = 0
    back_off: bool = False
    """A 429 that said nothing of its budget: decrease the adaptive factor."""

    @property
    def any(self) -> bool:
        return bool(self.pause_ms or self.interval_ms or self.back_off)


NO_HINT = BudgetHint()


def budget_hint(status: int, headers: Mapping[str, str], now_ms: int) -> BudgetHint:
    pause_ms = 0
    if status in (429, 503):
        asked_s = parse_retry_after_s(headers.get("retry-after"), now_ms)
        if asked_s is not None:
            pause_ms = _capped(asked_s * 1000)
    remaining, reset_ms = _remaining_and_reset(headers, now_ms)
    if remaining is not None and reset_ms is not None:
        if remaining == 0:
            pause_ms = max(pause_ms, reset_ms)
        elif reset_ms >= PACE_MIN_RESET_MS:
            return BudgetHint(pause_ms, reset_ms / remaining, reset_ms)
    if pause_ms:
        return BudgetHint(pause_ms=pause_ms)
    if status == 429:
        return BudgetHint(back_off=True)
    return NO_HINT


def _remaining_and_reset(headers: Mapping[str, str], now_ms: int) -> tuple[int | None, int | None]:
    structured = headers.get("ratelimit")
    if structured is not None:
        found = dict(_STRUCTURED.findall(structured))
        if "r" in found:
            reset = _reset_ms(found.get("t"), now_ms)
            return int(found["r"]), reset
    for prefix in ("ratelimit-", "x-ratelimit-"):
        remaining = _whole(headers.get(prefix + "remaining"))
        if remaining is not None:
            return remaining, _reset_ms(headers.get(prefix + "reset"), now_ms)
    return None, None


def _reset_ms(value: str | None, now_ms: int) -> int | None:
    number = _whole(value)
    if number is None:
        return None
    if number > _EPOCH_S * 1000:
        return _capped(number - now_ms)
    if number > _EPOCH_S:
        return _capped(number * 1000 - now_ms)
    return _capped(number * 1000)


def _whole(value: str | None) -> int | None:
    if value is None:
        return None
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 16:
        return None
    return int(text)


def _capped(ms: float) -> int:
    return math.ceil(max(0.0, min(ms, MAX_HINT_MS)))
