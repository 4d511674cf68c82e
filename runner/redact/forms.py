"""The forms a secret takes on the way out (JSON-escaped, percent-encoded, base64), and the
constants every part of redaction shares."""

from __future__ import annotations

import base64
import importlib
import json
import re
from urllib.parse import quote, quote_plus

REDACTED = "[REDACTED]"
MIN_SUBSTRING_LEN = 4
# A base64 run shorter than this is too likely to occur by chance inside unrelated base64.
_MIN_B64_CORE_LEN = 4

DEFAULT_SENSITIVE_NAMES: frozenset[str] = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "access_token",
        "refresh_token",
        "id_token",
        "client_secret",
    }
)

# Percent-encoding safe sets seen in practice: urllib's defaults, yarl's query and path.
_QUOTE_SAFE_SETS = ("", "/", "/:@!$&'()*+,;=")
_QUOTE_PLUS_SAFE_SETS = ("", "/?:@!$'()*,")
_HEX_ESCAPE = re.compile(r"%[0-9A-F]{2}")
AUTH_SCHEME = r"(?:(?:Bearer|Basic|Digest|Token|Negotiate|NTLM|Bot)\s+)?"
USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]{0,31}://)[^/\s?#@]*(?:@[^/\s?#@]*)*@")
# re's compiler itself: ``re.compile`` keeps the last 512 patterns it compiled, with their text,
# and a run's secrets must not outlive the run in memory (CONTRACT §4).
_re_compiler = importlib.import_module("re._compiler")


def compile_uncached(pattern: str) -> re.Pattern[str]:
    """``re.compile(pattern)``, without a copy left in ``re``'s cache."""
    compiled: re.Pattern[str] = _re_compiler.compile(pattern, 0)
    return compiled


def _b64_variants(raw: bytes) -> set[str]:
    """The full encodings plus, for each byte offset 0-2, the characters that depend only on
    ``raw``: what shows up when ``raw`` sits inside a longer base64-encoded string."""
    out: set[str] = set()
    for enc in (base64.b64encode, base64.urlsafe_b64encode):
        full = enc(raw).decode("ascii")
        out.add(full)
        out.add(full.rstrip("="))
        for offset in range(3):
            encoded = enc(b"\x00" * offset + raw).decode("ascii")
            start = -(-8 * offset // 6)
            end = (8 * (offset + len(raw))) // 6
            core = encoded[start:end]
            if len(core) >= _MIN_B64_CORE_LEN:
                out.add(core)
    return out


def _url_variants(value: str) -> set[str]:
    out: set[str] = set()
    for safe in _QUOTE_SAFE_SETS:
        out.add(quote(value, safe=safe))
    for safe in _QUOTE_PLUS_SAFE_SETS:
        out.add(quote_plus(value, safe=safe))
    out |= {_HEX_ESCAPE.sub(lambda m: m.group().lower(), v) for v in out}
    return out


def secret_variants(value: str) -> set[str]:
    """Every form in which ``value`` is looked for."""
    out = {value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}
    out |= _url_variants(value)
    out |= _b64_variants(value.encode("utf-8"))
    out.discard("")
    return out
