"""Limits on JSON the runner did not write: nesting depth and duplicate keys.

Everything decoded from outside (job data, definitions, credentials, API responses, OAuth2
token responses) is bounded in depth when it is decoded, so that every walk of it afterwards
(schema validation, JSONPath, redaction, checkpoint and event encoding, all recursive) stays
far inside Python's recursion limit. Without it, a response nested 200,000 deep ended as
``INTERNAL: RecursionError`` in whichever walker met it first.

The limit is one process-wide number, ``RUNNER_MAX_JSON_DEPTH`` (``configure`` at start; 128 by
default): a value built by a template from decoded data is at most the template's depth plus
the data's, so the walkers see at most about twice the limit, against a recursion limit of 1000.

Depth is counted in containers: ``1`` and ``[]`` are depth 0 and 1, ``{"a": [1]}`` is 2.

Duplicate keys (``{"workflowRunId": "a", "workflowRunId": "b"}``) are refused in job data
(``find_duplicate_key``): JavaScript and msgspec keep the last, other parsers the first, and a
run must not mean one thing to the producer and another to the runner. In API responses the
last wins, as in JavaScript, since the runner cannot ask an API to change.
"""

from __future__ import annotations

import json
from typing import Any

DEFAULT_MAX_DEPTH = 128
MAX_DEPTH_CEILING = 256  # above this the walkers could meet Python's recursion limit

_max_depth = DEFAULT_MAX_DEPTH


class JsonLimitError(Exception):
    """What was wrong, without any value from the data (key names are quoted, shortened)."""


def configure(max_depth: int) -> None:
    global _max_depth
    if not 1 <= max_depth <= MAX_DEPTH_CEILING:
        raise ValueError(f"the JSON depth limit must be within 1..{MAX_DEPTH_CEILING}")
    _max_depth = max_depth


def max_depth() -> int:
    return _max_depth


def too_deep_message(limit: int | None = None) -> str:
    return f"nested deeper than {limit or _max_depth} levels (RUNNER_MAX_JSON_DEPTH)"


def may_exceed(raw: bytes | str, limit: int | None = None) -> bool:
    """False when the text cannot be nested deeper than the limit: it holds fewer openers.
    Counting is C-speed, so a typical body is cleared without walking it."""
    limit = limit or _max_depth
    if isinstance(raw, str):
        return raw.count("[") + raw.count("{") > limit
    return raw.count(b"[") + raw.count(b"{") > limit


def depth_exceeds(value: Any, limit: int | None = None) -> bool:
    """Whether a decoded value nests deeper than ``limit``; iterative, stops at the first
    container past it."""
    limit = limit or _max_depth
    if not isinstance(value, (dict, list)):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def check_text(raw: bytes | str, limit: int | None = None) -> None:
    """Raise ``JsonLimitError`` if JSON text nests deeper than the limit, or holds a duplicate
    key. For job data and definitions (a megabyte at most): the text is parsed once by the
    standard library to see each object's keys as written."""
    limit = limit or _max_depth
    if isinstance(raw, str):
        openers = raw.count("{")
        deep = openers + raw.count("[") > limit
    else:
        openers = raw.count(b"{")
        deep = openers + raw.count(b"[") > limit
    if not openers and not deep:
        return
    try:
        value = json.loads(raw, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise JsonLimitError(too_deep_message(limit)) from None
    except (ValueError, UnicodeDecodeError):
        return  # not JSON at all: the typed decoder says so, with its position
    if deep and depth_exceeds(value, limit):
        raise JsonLimitError(too_deep_message(limit))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JsonLimitError(f"duplicate key {_quoted(key)}")
            seen.add(key)
    return result


def _quoted(key: str) -> str:
    shown = key if len(key) <= 60 else key[:57] + "..."
    return json.dumps(shown)
