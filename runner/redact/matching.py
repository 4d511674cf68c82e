"""How secrets and sensitive names are found in a text: plain searches for long secrets, a
bounded regex for short ones, a prefix-tree regex and cheap probes for names."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from runner.redact.forms import AUTH_SCHEME, MIN_SUBSTRING_LEN, compile_uncached, secret_variants


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


def holds_name(
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


def trie_pattern(words: Iterable[str]) -> str:
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


def secret_matchers(
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
        bounded = r"(?<![A-Za-z0-9])(?:" + trie_pattern(short_words) + r")(?![A-Za-z0-9])"
        patterns = (compile_uncached(bounded),)
    longest = max((len(w) for w in long_words | short_words), default=0)
    return longest_first(long_words), patterns, longest


def longest_first(words: Iterable[str]) -> tuple[str, ...]:
    """Longest first, so that a form inside a longer one is masked with it, not before it."""
    return tuple(sorted(words, key=lambda w: (-len(w), w)))


NameMatchers = tuple[
    re.Pattern[str], tuple[str, ...], tuple[str, ...], tuple[str, ...], re.Pattern[str] | None
]


@functools.lru_cache(maxsize=64)
def name_matchers(names: frozenset[str]) -> NameMatchers:
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
    other_probe = re.compile(trie_pattern(others)) if others else None
    return compile_names(names), kept, shared_words, alone, other_probe


def compile_names(names: frozenset[str]) -> re.Pattern[str]:
    """The regex that masks the value of any of ``names``: a quoted pair, a header line, a
    query or form parameter."""
    alt = trie_pattern(names)
    return re.compile(
        # "name": "value" / 'name': 'value' (JSON, Python reprs of dicts and multidicts)
        r"(?P<q1>[\"'])(?:" + alt + r")(?P=q1)\s*[:=,]\s*(?P<q2>[\"'])"
        r"(?P<qv>(?:\\.|(?!(?P=q2))[^\\])*)(?P=q2)"
        # name: value to the end of the line (an HTTP header as text)
        r"|(?<![\w\-])(?:" + alt + r")[ \t]*:[ \t]*(?P<hv>(?![\"'])[^\r\n]+)"
        # name=value in a query string, a form body or key=value logging
        r"|(?<![^?&;\s])(?:" + alt + r")=(?P<pv>" + AUTH_SCHEME + r"[^&#\s'\"<>]*)",
        re.IGNORECASE,
    )
