"""The secrets of every run in flight in one process, and the redactors made from them.

One ``SecretRegistry`` per process, made by the composition root (``runner.app``) and handed to
what needs it: the run service, the OAuth2 token manager, the stdout log and the execution log.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import msgspec

from runner.redact.redactor import Redactor

_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.Decoder().decode


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


class LayeredRedactor:
    """A run's own redactor, then the tokens the process minted: for runs whose secrets can
    change while they run (an OAuth2 refresh registers the new tokens in the process's
    registry as minted). Not every run's secrets: a search per set of them, in every event."""

    def __init__(self, own: Redactor, registry: SecretRegistry) -> None:
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
