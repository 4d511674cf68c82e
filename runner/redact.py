"""The one place secrets are removed from anything the runner writes out.

A ``Redactor`` is built from the secret values resolved for a run and the sensitive names
(API-key header or query parameter, custom auth headers). It masks:

- every secret value, also in the forms it takes on the way out: JSON-escaped, percent-encoded
  (the variants urllib and yarl produce, upper- and lower-case hex) and base64 (standard and
  URL-safe, aligned at any byte offset, so a password inside ``base64("user:pass")`` is found
  whatever the username);
- the value of the ``Authorization``, ``Proxy-Authorization``, ``Cookie`` and ``Set-Cookie``
  headers, of the OAuth2 token parameters, and of every sensitive name, wherever it appears as a
  header, a query/form parameter, a ``"name": "value"`` pair or a dict key;
- userinfo in URLs (``https://user:pass@host`` becomes ``https://[REDACTED]@host``).

Short secrets (fewer than ``MIN_SUBSTRING_LEN`` = 4 characters) are a deliberate special case.
Masking every occurrence of ``"ab"`` inside other words would mangle every log line and, worse,
act as an oracle: the pattern of masked letters would spell out the secret. They are therefore
masked wherever they stand as a token of their own (not touching a letter or digit on either side:
``"pw": "ab"``, ``?k=ab``, ``ab`` alone, a dict value equal to it), and never inside longer words.
Their headers, parameters and dict keys are masked by name as usual.

Every form of a long secret is searched for and replaced as plain text, longest first, so that
where forms of two secrets overlap the longer is masked; there is no regex of secrets to compile
(that cost more than a run's status writes). The short secrets' forms are one regex, for their
bounds.

``SECRETS`` is the process-wide registry: each run registers its secrets for as long as it is in
flight, and the stdout logger and the exception hook use ``SECRETS.redactor()``, which sees the
secrets of every run (and every refreshed OAuth2 token) in this process.
"""

from __future__ import annotations

import base64
import functools
import importlib
import json
import re
import threading
import traceback
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, quote_plus, unquote_plus, urlsplit, urlunsplit

import msgspec

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
_AUTH_SCHEME = r"(?:(?:Bearer|Basic|Digest|Token|Negotiate|NTLM|Bot)\s+)?"
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]{0,31}://)[^/\s?#@]*(?:@[^/\s?#@]*)*@")
# re's compiler itself: ``re.compile`` keeps the last 512 patterns it compiled, with their text,
# and a run's secrets must not outlive the run in memory (CONTRACT §4).
_re_compiler = importlib.import_module("re._compiler")


def _compile_uncached(pattern: str) -> re.Pattern[str]:
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


def _name_probes(names: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What to search a text for to know whether it may hold one of ``names``: the words (of
    5 characters or more, between ``_`` and ``-``) that two names or more share, and each name
    that holds none of them. A text that holds none of these holds no name; a hit on a shared
    word still needs the names themselves searched."""
    holders: dict[str, set[str]] = {}
    for name in names:
        for word in re.split(r"[-_]", name):
            if len(word) >= 5:
                holders.setdefault(word, set()).add(name)
    shared = tuple(sorted(w for w, held_by in holders.items() if len(held_by) > 1))
    alone = tuple(sorted(n for n in names if not any(w in n for w in shared)))
    return shared, alone


def _holds_name(
    lowered: str, words: tuple[str, ...], alone: tuple[str, ...], names: tuple[str, ...]
) -> bool:
    """Whether the lower-cased text holds one of ``names``, by the probes of ``_name_probes``: a
    hit on one of ``words``, which several names share, is settled by searching the names
    themselves; the names that share none are searched as they are (``alone``)."""
    for word in words:
        if word in lowered:
            return any(name in lowered for name in names)
    for name in alone:
        if name in lowered:
            return True
    return False


def _trie_pattern(words: Iterable[str]) -> str:
    """A regex matching any of ``words``, longest first at a position, as a prefix tree so the
    regex engine tests one branch per character instead of one per word."""
    ordered = sorted(set(words))
    if not ordered:
        return "(?!)"
    return _trie_branch(ordered, 0, len(ordered), 0)


def _trie_branch(ordered: list[str], lo: int, hi: int, offset: int) -> str:
    """The pattern of ``ordered[lo:hi]``, which share ``ordered[lo][:offset]``; sorted, so a
    shorter word comes first. A function of its own, not a closure that calls itself: that
    closure would be a reference cycle holding the words (secrets, for a run's redactor) until
    the cyclic collector happened to run."""
    first, last = ordered[lo], ordered[hi - 1]
    common = offset
    limit = min(len(first), len(last))
    while common < limit and first[common] == last[common]:
        common += 1
    literal = re.escape(first[offset:common])
    optional = len(first) == common
    if optional:
        lo += 1
    if lo == hi:
        return literal
    branches = []
    start = lo
    while start < hi:
        char = ordered[start][common]
        end = start + 1
        while end < hi and ordered[end][common] == char:
            end += 1
        branches.append(_trie_branch(ordered, start, end, common))
        start = end
    rest = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    if optional:
        return f"{literal}(?:{rest})?"
    return literal + rest


def _secret_matchers(
    secrets: frozenset[str],
) -> tuple[tuple[str, ...], tuple[re.Pattern[str], ...], int]:
    """What finds ``secrets``: every form of the long ones, longest first, searched and
    replaced as plain text; a pattern for the short ones, which must stand as a token of
    their own; and the length of the longest form. No regex for the long ones: compiling
    one of a secret's six forms took about 0.4 ms (``sre_parse`` walks the pattern a
    character at a time), each run with credentials of its own paid it, and searching it
    (an alternation, so no fast scan for a prefix) took 4.5 µs in a 400-character status
    event, against 1.0 µs for the six plain searches."""
    long_words: set[str] = set()
    short_words: set[str] = set()
    for secret in secrets:
        for variant in secret_variants(secret):
            if len(variant) >= MIN_SUBSTRING_LEN and len(secret) >= MIN_SUBSTRING_LEN:
                long_words.add(variant)
            else:
                short_words.add(variant)
    patterns: tuple[re.Pattern[str], ...] = ()
    if short_words:
        bounded = r"(?<![A-Za-z0-9])(?:" + _trie_pattern(short_words) + r")(?![A-Za-z0-9])"
        patterns = (_compile_uncached(bounded),)
    longest = max((len(w) for w in long_words | short_words), default=0)
    return _longest_first(long_words), patterns, longest


def _longest_first(words: Iterable[str]) -> tuple[str, ...]:
    """Longest first, so that a form inside a longer one is masked with it, not before it."""
    return tuple(sorted(words, key=lambda w: (-len(w), w)))


_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.Decoder().decode
# Below this, a clean part is searched again with the whole text when there is no secret to
# search for (``Redactor.is_clean_around``).
_AROUND_FROM_BYTES = 512


_NameMatchers = tuple[
    re.Pattern[str], tuple[str, ...], tuple[str, ...], tuple[str, ...], re.Pattern[str] | None
]


@functools.lru_cache(maxsize=64)
def _name_matchers(names: frozenset[str]) -> _NameMatchers:
    """What finds ``names`` (lower-cased), made once for each set of names (they are names,
    not secrets: a header or parameter name): the masking regex, and the probes that decide
    whether to run it.

    re.IGNORECASE defeats the regex engine's literal-prefix scan (8x slower on a typical line),
    so plain substring searches over the lower-cased text decide whether to run it; names
    outside ASCII are probed by a regex. A name that holds another (``set-cookie``, ``cookie``)
    needs no search of its own: it is found only where the shorter one is. Fewer searches
    still: a word several names share stands for them all (``token`` for ``access_token``,
    ``id_token`` and ``refresh_token``); only where it occurs are the names themselves
    searched."""
    ascii_names = [n for n in names if n.isascii()]
    kept = tuple(sorted(n for n in ascii_names if not any(o != n and o in n for o in ascii_names)))
    shared_words, alone = _name_probes(kept)
    others = [n for n in names if not n.isascii()]
    other_probe = re.compile(_trie_pattern(others)) if others else None
    return Redactor._compile_names(names), kept, shared_words, alone, other_probe


class Redactor:
    """Masks a fixed set of secrets and sensitive names. Immutable; build one per run, or use
    ``SECRETS.redactor()`` for everything in flight in the process."""

    __slots__ = (
        "_alone",
        "_ascii_names",
        "_longest_form",
        "_names",
        "_names_re",
        "_other_names_probe",
        "_reach",
        "_secret_patterns",
        "_secret_words",
        "_secrets",
        "_shared_words",
    )

    def __init__(self, secrets: Iterable[str] = (), sensitive_names: Iterable[str] = ()) -> None:
        self._secrets: frozenset[str] = frozenset(s for s in secrets if s)
        self._names: frozenset[str] = DEFAULT_SENSITIVE_NAMES | {
            n.lower() for n in sensitive_names if n
        }
        self._secret_words, self._secret_patterns, self._longest_form = _secret_matchers(
            self._secrets
        )
        (
            self._names_re,
            self._ascii_names,
            self._shared_words,
            self._alone,
            self._other_names_probe,
        ) = _name_matchers(self._names)
        self._reach: int | None = self._reach_now()

    def _reach_now(self) -> int | None:
        """How far into a text a match can reach from outside it (``is_clean_around``): the
        longest name or form of a secret, and one character more for the bounds of a short
        secret. None when a name is not ASCII: lower-casing is then not one character at a
        time (a final sigma depends on what follows), so only whole texts are checked."""
        if self._other_names_probe is not None:
            return None
        return max(max(len(n) for n in self._names), self._longest_form) + 1

    @staticmethod
    def combined(parts: Iterable[Redactor]) -> Redactor:
        """A redactor that masks what every one of ``parts`` masks, made from what they hold
        (their secrets' forms, the patterns of their short secrets) without computing or
        compiling anything again. The process-wide redactor is one, made again whenever a set
        of secrets comes or goes."""
        held = list(parts)
        names: set[str] = set()
        for part in held:
            names |= part._names
        out = Redactor((), names)
        words: set[str] = set()
        patterns: list[re.Pattern[str]] = []
        secrets: set[str] = set()
        for part in held:
            secrets |= part._secrets
            words.update(part._secret_words)
            out._longest_form = max(out._longest_form, part._longest_form)
            for pattern in part._secret_patterns:
                if not any(pattern is p for p in patterns):
                    patterns.append(pattern)
        out._secrets = frozenset(secrets)
        out._secret_words = _longest_first(words)
        out._secret_patterns = tuple(patterns)
        out._reach = out._reach_now()
        return out

    @staticmethod
    def _compile_names(names: frozenset[str]) -> re.Pattern[str]:
        alt = _trie_pattern(names)
        return re.compile(
            # "name": "value" / 'name': 'value' (JSON, Python reprs of dicts and multidicts)
            r"(?P<q1>[\"'])(?:" + alt + r")(?P=q1)\s*[:=,]\s*(?P<q2>[\"'])"
            r"(?P<qv>(?:\\.|(?!(?P=q2))[^\\])*)(?P=q2)"
            # name: value to the end of the line (an HTTP header as text)
            r"|(?<![\w\-])(?:" + alt + r")[ \t]*:[ \t]*(?P<hv>(?![\"'])[^\r\n]+)"
            # name=value in a query string, a form body or key=value logging
            r"|(?<![^?&;\s])(?:" + alt + r")=(?P<pv>" + _AUTH_SCHEME + r"[^&#\s'\"<>]*)",
            re.IGNORECASE,
        )

    @property
    def secrets(self) -> frozenset[str]:
        return self._secrets

    @property
    def sensitive_names(self) -> frozenset[str]:
        return self._names

    def extended(
        self, secrets: Iterable[str] = (), sensitive_names: Iterable[str] = ()
    ) -> Redactor:
        """A redactor that also masks ``secrets`` and ``sensitive_names``."""
        return Redactor(self._secrets | set(secrets), self._names | set(sensitive_names))

    def is_sensitive_name(self, name: str) -> bool:
        return name.lower() in self._names

    def text(self, s: str) -> str:
        for word in self._secret_words:
            s = s.replace(word, REDACTED)  # one scan; the same string back when it is absent
        for pattern in self._secret_patterns:
            s = pattern.sub(REDACTED, s)
        if self._may_name(s.lower()):
            s = self._names_re.sub(_mask_named_value, s)
        if "@" in s and "://" in s:
            s = _USERINFO.sub(r"\1" + REDACTED + "@", s)
        return s

    def url(self, url: str) -> str:
        try:
            parts = urlsplit(url)
        except ValueError:
            return self.text(url)
        netloc = parts.netloc
        if "@" in netloc:
            netloc = REDACTED + "@" + netloc.rpartition("@")[2]
        query = "&".join(self._query_pair(pair) for pair in parts.query.split("&"))
        rebuilt = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
        return self.text(rebuilt)

    def _query_pair(self, pair: str) -> str:
        name, sep, _ = pair.partition("=")
        if sep and self.is_sensitive_name(unquote_plus(name)):
            return f"{name}={REDACTED}"
        return pair

    def headers(self, headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
        """Header values masked by name, and every other value scrubbed of secrets; repeated
        names (``Set-Cookie``) are joined rather than lost."""
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        out: dict[str, str] = {}
        for name, value in pairs:
            masked = REDACTED if self.is_sensitive_name(name) else self.text(str(value))
            out[name] = f"{out[name]}, {masked}" if name in out else masked
        return out

    def json(self, obj: Any) -> bytes:
        """``obj`` as JSON, redacted. The hot path of every status event: one encode and two
        scans of the text; only data that holds a secret or a sensitive name is walked."""
        raw = _json_encode(obj)
        if self.is_clean_json(raw):
            return raw
        # Decode what was encoded: plain data whatever ``obj`` held (Structs, msgspec.Raw).
        return _json_encode(self.value(_json_decode(raw)))

    def json_checked(self, obj: Any) -> tuple[bytes, bool]:
        """``json(obj)``, and whether that is ``obj`` as encoded, clean (nothing was masked):
        a clean encoding embedded in other JSON needs only the text around it searched
        (``json_around``)."""
        raw = _json_encode(obj)
        if self.is_clean_json(raw):
            return raw, True
        return _json_encode(self.value(_json_decode(raw))), False

    def json_around(self, obj: Any, clean: bytes) -> bytes:
        """``json(obj)``, for data that embeds ``clean`` (as ``msgspec.Raw``), an encoding
        ``json_checked`` found clean: the text around it is searched, not ``clean`` again.
        A step's output is embedded in its status event and its checkpoint field, and was
        searched three times."""
        raw = _json_encode(obj)
        if self.is_clean_around(raw, clean):
            return raw
        return _json_encode(self.value(_json_decode(raw)))

    def is_clean_around(self, raw: bytes, clean: bytes) -> bool:
        """``is_clean_json(raw)``, where ``raw`` holds ``clean`` and ``clean`` is clean by
        itself. A match in ``raw`` lies inside ``clean`` (there is none: a search of
        ``clean`` alone finds every match it holds in place, since the bounds of a short
        secret only add conditions), or reaches outside it, and then lies within ``reach``
        characters of its ends: so what is searched is the text before ``clean`` and after it,
        each with ``reach`` characters of ``clean``. URL userinfo is checked on the whole
        (``@`` and ``://`` anywhere). ``clean`` must be ASCII, so that no cut splits a
        character and lower-casing it is the same alone or in place; otherwise, or when
        ``clean`` is too short to gain anything, the whole is searched. Without secrets only
        names are searched, which is cheap per character: searching around then pays only
        from ``_AROUND_FROM_BYTES`` (measured, compiled: a 212-byte output in a 539-byte
        event, 1.0 µs whole against 1.4 around; 1,712 in 2,039, 3.2 against 1.5; with a
        secret, 4.0 against 3.9 and 15.6 against 4.5)."""
        reach = self._reach
        if (
            reach is None
            or len(clean) <= 2 * reach
            or (not self._secrets and len(clean) < _AROUND_FROM_BYTES)
            or not clean.isascii()
        ):
            return self.is_clean_json(raw)
        # Found from its end, which is near the end of ``raw`` (an output is followed by a few
        # short fields), and then compared whole: ``raw.find(clean)`` prepares a search for
        # the whole of ``clean``, which cost more than the search it saves.
        probe = clean[-16:]
        end = raw.rfind(probe) + len(probe)
        start = end - len(clean)
        if start < 0 or not raw.startswith(clean, start):
            return self.is_clean_json(raw)
        if b"@" in raw and b"://" in raw:
            return False
        return self.is_clean_json(raw[: start + reach]) and self.is_clean_json(raw[end - reach :])

    def is_clean(self, text: str) -> bool:
        """Whether ``text`` holds no secret, no sensitive name and no URL userinfo, so that no
        rendering of the data it was made from needs masking."""
        for word in self._secret_words:
            if word in text:
                return False
        for pattern in self._secret_patterns:
            if pattern.search(text) is not None:
                return False
        if self._may_name(text.lower()):
            return False
        return not ("@" in text and "://" in text)

    def _may_name(self, lowered: str) -> bool:
        """Whether a sensitive name occurs in the lower-cased text: substring searches, which
        beat the regex probe about threefold on a typical line."""
        if _holds_name(lowered, self._shared_words, self._alone, self._ascii_names):
            return True
        probe = self._other_names_probe
        return probe is not None and probe.search(lowered) is not None

    def is_clean_json(self, raw: bytes) -> bool:
        """``is_clean`` for encoded JSON (UTF-8). Decoded first: searching the text is a
        quarter faster than searching the bytes (1.3 against 1.7 µs for a step's status
        event), and ``str.lower`` folds what ``bytes.lower`` leaves, as the masking does."""
        return self.is_clean(raw.decode("utf-8", "replace"))

    def scrubbed(self, obj: Any) -> Any:
        """``value(obj)``, but ``obj`` itself when nothing in it needs masking: one encode and
        one scan of the text (the check ``json`` makes) instead of a walk that scans every
        string on its own. The hot path of the execution log, whose documents hold each step's
        output. What it returns may be ``obj`` itself: a caller that keeps it must own it (the
        MongoDB sink's documents hold a fresh copy; the stdout log writes it at once)."""
        if isinstance(obj, str):
            return self.value(obj)  # one string: its own scan is the cheaper one
        try:
            raw = _json_encode(obj)
        except Exception:
            return self.value(obj)  # not JSON-encodable as it is: the walk copes with more
        return obj if self.is_clean_json(raw) else self.value(obj)

    def value(self, obj: Any) -> Any:
        """A deep copy of JSON-like data with secrets masked in strings (keys included) and the
        value of every sensitive key replaced."""
        if isinstance(obj, str):
            return REDACTED if obj in self._secrets else self.text(obj)
        if isinstance(obj, Mapping):
            out: dict[Any, Any] = {}
            for key, item in obj.items():
                if isinstance(key, str):
                    out[self.text(key)] = (
                        REDACTED if self.is_sensitive_name(key) else self.value(item)
                    )
                else:
                    out[key] = self.value(item)
            return out
        if isinstance(obj, list):
            return [self.value(item) for item in obj]
        if isinstance(obj, tuple):
            return tuple(self.value(item) for item in obj)
        if isinstance(obj, int | float) and not isinstance(obj, bool) and str(obj) in self._secrets:
            return REDACTED
        return obj

    def exception_text(self, exc: BaseException, *, with_traceback: bool = False) -> str:
        if with_traceback:
            return self.text("".join(traceback.format_exception(exc)))
        return self.text(f"{type(exc).__name__}: {exc}")


def _mask_named_value(match: re.Match[str]) -> str:
    group = next(g for g in ("qv", "hv", "pv") if match.group(g) is not None)
    start, end = match.span(group)
    whole_start = match.start()
    text = match.group(0)
    return text[: start - whole_start] + REDACTED + text[end - whole_start :]


_Key = tuple[frozenset[str], frozenset[str]]


def _counted(counts: dict[_Key, int], key: _Key, delta: int) -> bool:
    """Count a registration of ``key`` in (1) or out (-1); whether ``key`` came or went."""
    users = counts.get(key, 0) + delta
    if users:
        counts[key] = users
    else:
        del counts[key]
    return users == (1 if delta > 0 else 0)


class SecretRegistry:
    """Secrets of every run in flight in this process. Thread-safe: the logger may run anywhere.

    Each registration's secrets and names get a ``Redactor`` (``run_redactor``), built when
    they are first registered and shared by every registration with the same, then forgotten
    with the last of them, so that secrets stay in memory only while a run that has them is in
    flight (CONTRACT §4). Runs of one connection build it once.

    ``redactor()`` masks everything registered: made from those redactors without compiling
    (``Redactor.combined``), and made again only when a registration with other secrets or
    names comes or the last with some goes. ``minted_redactor()`` masks only what was
    registered as ``minted``: the OAuth2 tokens the process refreshed, which a run of the same
    connection must mask too although they came after its start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # handle -> its (secrets, names) and whether they were minted
        self._entries: dict[int, tuple[_Key, bool]] = {}
        self._next_handle = 0
        self._cached: Redactor | None = Redactor()
        self._minted_cached: Redactor | None = Redactor()
        self._redactors: dict[_Key, Redactor] = {}
        # how many registrations hold each (secrets, names); of them, how many as minted
        self._users: dict[_Key, int] = {}
        self._minted: dict[_Key, int] = {}

    def register(
        self,
        values: Iterable[str],
        sensitive_names: Iterable[str] = (),
        extra: Iterable[str] = (),
        *,
        minted: bool = False,
    ) -> int:
        """Hold ``values`` and ``sensitive_names`` (a run's; ``extra``: secrets its redactor
        masks too, the process's own) until ``unregister``. ``minted``: secrets the process
        made, which runs already in flight must mask (``minted_redactor``)."""
        key = (
            frozenset(v for v in (*values, *extra) if v),
            frozenset(n.lower() for n in sensitive_names if n),
        )
        with self._lock:
            held = key in self._redactors
        # Built outside the lock, which the logger may be waiting on.
        made = None if held else Redactor(key[0], key[1])
        with self._lock:
            self._next_handle += 1
            self._entries[self._next_handle] = (key, minted)
            if key not in self._redactors:
                assert made is not None
                self._redactors[key] = made
            if _counted(self._users, key, 1):
                self._cached = None
            if minted and _counted(self._minted, key, 1):
                self._minted_cached = None
            return self._next_handle

    def unregister(self, handle: int) -> None:
        with self._lock:
            entry = self._entries.pop(handle, None)
            if entry is None:
                return
            key, minted = entry
            if _counted(self._users, key, -1):
                del self._redactors[key]
                self._cached = None
            if minted and _counted(self._minted, key, -1):
                self._minted_cached = None

    def run_redactor(self, handle: int) -> Redactor:
        """The redactor of the registration ``handle``: its secrets, its ``extra`` ones and
        its names, shared with every registration that has the same."""
        with self._lock:
            return self._redactors[self._entries[handle][0]]

    @property
    def shared(self) -> int:
        """Redactors held, one per set of secrets and names (for tests)."""
        with self._lock:
            return len(self._redactors)

    def redactor(self) -> Redactor:
        with self._lock:
            if self._cached is None:
                self._cached = Redactor.combined(self._redactors.values())
            return self._cached

    def minted_redactor(self) -> Redactor:
        with self._lock:
            if self._minted_cached is None:
                self._minted_cached = Redactor.combined(self._redactors[k] for k in self._minted)
            return self._minted_cached


SECRETS = SecretRegistry()


def redact_exception_text(
    exc: BaseException, *, redactor: Redactor | None = None, with_traceback: bool = False
) -> str:
    """``"<Type>: <message>"`` (or the formatted traceback) of any exception, with every secret
    in flight, URL userinfo, sensitive query parameters and sensitive headers masked: aiohttp's
    ``ClientResponseError`` and ``InvalidURL`` put the full URL (and, in ``repr``, the request
    headers) into their text."""
    return (redactor or SECRETS.redactor()).exception_text(exc, with_traceback=with_traceback)


class LayeredRedactor:
    """A run's own redactor, then the tokens the process minted: for runs whose secrets can
    change while they run (an OAuth2 refresh registers the new tokens in ``SECRETS`` as
    minted). Not every run's secrets: a search per set of them, in every event."""

    def __init__(self, own: Redactor, registry: SecretRegistry = SECRETS) -> None:
        self.own = own
        self.registry = registry

    def text(self, s: str) -> str:
        return self.registry.minted_redactor().text(self.own.text(s))

    def value(self, obj: Any) -> Any:
        return self.registry.minted_redactor().value(self.own.value(obj))

    def json(self, obj: Any) -> bytes:
        return self.json_checked(obj)[0]

    def scrubbed(self, obj: Any) -> Any:
        return self.registry.minted_redactor().scrubbed(self.own.scrubbed(obj))

    def json_checked(self, obj: Any) -> tuple[bytes, bool]:
        shared = self.registry.minted_redactor()
        raw = _json_encode(obj)
        text = raw.decode("utf-8", "replace")
        if self.own.is_clean(text) and shared.is_clean(text):
            return raw, True
        return _json_encode(shared.value(self.own.value(_json_decode(raw)))), False

    def json_around(self, obj: Any, clean: bytes) -> bytes:
        """As ``Redactor.json_around`` for the run's own secrets; the minted ones are searched
        in the whole, since a refreshed token may have joined them since ``clean`` was
        checked."""
        shared = self.registry.minted_redactor()
        raw = _json_encode(obj)
        if self.own.is_clean_around(raw, clean) and shared.is_clean_json(raw):
            return raw
        return _json_encode(shared.value(self.own.value(_json_decode(raw))))
