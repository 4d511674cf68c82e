"""What attackers and careless authors send, as hypothesis strategies the hostile suites share
(``tests/unit/test_hostile_properties.py``, ``tests/integration/test_hostile_suite.py``).

Runs are bounded and deterministic by default (derandomized, no example database), so
``scripts/test`` takes the same seconds and finds the same things every time. A long soak:
``HYPOTHESIS_PROFILE=soak scripts/test tests/unit/test_hostile_properties.py
tests/integration/test_hostile_suite.py`` (random, many more examples; a failure prints the
example to reproduce with ``@example``).

Add a class here when you think of one: the suites draw from these.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

SOAK = os.environ.get("HYPOTHESIS_PROFILE", "") == "soak"
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

BOUNDED = settings(
    max_examples=3000 if SOAK else 120,
    deadline=None,
    derandomize=not SOAK,
    database=None,
    suppress_health_check=_QUIET,
)
# End to end an example costs a job through Redis and a real worker: tens of milliseconds.
END_TO_END = settings(BOUNDED, max_examples=600 if SOAK else 60)

# Issue 21's bound on how long one run may hold the event loop. A behaviour bound, not the
# test's time: a healthy loop is late by a few milliseconds, the bugs it catches by seconds.
MAX_LOOP_LAG_MS = 100.0

# --- characters and strings ---------------------------------------------------------------------

NASTY_STRINGS = [
    "",
    "\x00",
    "a\x00b",
    "\ud800",  # a lone surrogate: not encodable as UTF-8
    "\udfff\ud800",
    "\u202e",  # right-to-left override
    "\ufeff",
    "\r\nX-Injected: 1",
    "../../admin",
    "%2e%2e%2f",
    "{{ secrets.token }}",
    "\\{{ input.x }}",
    "{{",
    "}}",
    "$..*",
    "__proto__",
    "constructor",
    "prototype",
    "toString",
    "NaN",
    "Infinity",
    "1e999",
    "-0",
    "9" * 400,
    "é" * 50,
    "😀" * 20,
    "x" * 70_000,  # over the 64 KiB off-loop threshold on its own
]

hostile_text = (
    st.sampled_from(NASTY_STRINGS)
    | st.text(max_size=30)
    | st.text(alphabet=st.characters(codec=None, categories=["Cs", "Cc", "Zs"]), max_size=10)
)
# What a producer can send at all: JSON text is UTF-8, so no lone surrogate (job data holding
# one is INVALID_PAYLOAD; ``hostile_text`` has them).
utf8_text = (
    st.sampled_from([s for s in NASTY_STRINGS if not any(0xD800 <= ord(c) < 0xE000 for c in s)])
    | st.text(max_size=30)
    | st.text(alphabet=st.characters(categories=["Cc", "Zs", "So"]), max_size=10)
)

json_keys = st.sampled_from(["__proto__", "constructor", "", "a", "a.b", "$", "@", "\x00"]) | (
    st.text(max_size=8)
)


def _documents(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.integers(min_value=2**63, max_value=2**70)
        | st.floats(allow_nan=False, allow_infinity=False)
        | text
    )
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(json_keys, children, max_size=4)
        ),
        max_leaves=12,
    )


json_documents: st.SearchStrategy[Any] = _documents(hostile_text)
utf8_documents: st.SearchStrategy[Any] = _documents(utf8_text)


def nested_text(depth: int, opener: str = "[", closer: str = "]") -> str:
    return opener * depth + closer * depth


# JSON text no encoder writes: numbers out of range, NaN, lone surrogate escapes, duplicate
# keys, nesting past any limit, unterminated documents, control characters.
hostile_json_text = st.sampled_from(
    [
        "1e999",
        "-1e999",
        "NaN",
        "Infinity",
        "9" * 5000,
        '{"a": 1e999}',
        '{"a": ' + "9" * 4400 + "}",
        '"\\ud800"',
        '"\\u0000"',
        '{"\\u0000": 1}',
        '{"a": 1, "a": 2}',
        '{"__proto__": {"isAdmin": true}}',
        nested_text(129),
        nested_text(100_000),
        '{"a":' * 1000 + "1" + "}" * 1000,
        "[" * 10_000,
        '{"a": "',
        "\x00",
        "[1,]",
        "{'a': 1}",
        '"' + "x" * 100_000 + '"',
    ]
) | st.builds(lambda v: json.dumps(v, ensure_ascii=False), json_documents)
