"""The egress policy: which addresses a workflow step may connect to (SSRF protection).

This module owns the decision and the two places aiohttp lets us enforce it; it knows nothing
of steps, runs or settings parsing beyond ``RUNNER_EGRESS_ALLOW``'s own syntax. What an
address is (the refused ranges, the spellings of a literal) is ``runner.http.addresses``.

By default a step may not reach loopback, private (RFC 1918, IPv6 ULA), link-local (including
cloud metadata such as 169.254.169.254), carrier-grade NAT, multicast, unspecified, broadcast,
reserved, benchmarking or documentation addresses, nor an IPv6 address that wraps a denied
IPv4 one (IPv4-mapped, IPv4-compatible, 6to4, NAT64; Teredo is denied outright).
``RUNNER_EGRESS_ALLOW`` (comma-separated host names, ``*.suffix`` wildcards, IP addresses and
CIDRs) lets chosen destinations through anyway. A refusal is
``TransportError(code=EGRESS_DENIED)`` whose message names the host and the reason, built from
the host only: URLs carry query secrets, so no URL ever reaches a message.

Enforcement, and why it takes two hooks:

* ``GuardedResolver`` is the connector's resolver. It resolves a name, drops every denied
  address and hands aiohttp only the addresses it checked; aiohttp connects to exactly those,
  so DNS cannot answer differently between the check and the connect (no rebinding window).
  The connector caches what the resolver returned, i.e. only checked addresses.
* aiohttp's ``TCPConnector._resolve_host`` never calls the resolver for a host that looks like
  an IP literal (contains ``:`` or only digits and dots). Such hosts must be checked before the
  request is sent: ``egress_middleware(policy)`` does it for every request, and aiohttp runs
  session middlewares again for each redirect hop it follows, so redirects are checked too.
  A client that does not use the middleware must call ``policy.check_url_host(url.raw_host)``
  itself before every request and every redirect hop.

Spellings: yarl 1.25 keeps ``2130706433``, ``0177.0.0.1``, ``0x7f.1`` and ``127.1`` as they
are; aiohttp 3.14 refuses the all-digit ones itself, but ``0x7f.1`` goes to the resolver and
``getaddrinfo`` reads it as 127.0.0.1. ``check_url_host`` parses every inet_aton spelling
(decimal, octal, hex, 1-4 parts), percent-escapes, brackets, IPv6 zones and trailing dots, and
the resolver runs the same check before resolving, so a spelling is refused whichever hook
sees it.

Wiring (what the client does)::

    policy = EgressPolicy.from_setting(os.environ.get("RUNNER_EGRESS_ALLOW"))
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=GuardedResolver(policy)),
        middlewares=(egress_middleware(policy),),
        trust_env=False,  # a proxy would resolve names itself, out of the policy's sight
    )
    # allow_redirects=False unless the redirect setting is on; when it is, aiohttp follows
    # them and each hop passes the middleware (literals) and the resolver (names) again.
    try:
        ...
    except BaseException as exc:
        if (denied := egress_error(exc)) is not None:
            raise denied from None

The resolver raises the ``TransportError`` itself; since it is not an ``OSError``, aiohttp 3.14
does not wrap it in ``ClientConnectorDNSError`` and it reaches the caller as is.
``egress_error`` also searches causes, contexts and exception groups in case a wrapper does.
The control plane is exempt from this policy: build its session without these hooks.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_middlewares import ClientHandlerType, ClientMiddlewareType
from aiohttp.client_reqrep import ClientRequest, ClientResponse
from yarl import URL

from runner.errors import ErrorCode, TransportError
from runner.http.addresses import (
    NUMERIC_LABEL,
    IPAddress,
    IPNetwork,
    address_denial_reason,
    parse_ip_literal,
    without_scope,
)

__all__ = [
    "EgressPolicy",
    "GuardedResolver",
    "egress_error",
    "egress_middleware",
]

# RFC 6761 reserves localhost and every name under it; the others are Debian /etc/hosts aliases.
_LOOPBACK_NAMES: Final = frozenset(
    {"localhost", "localhost.localdomain", "localhost6", "localhost6.localdomain6"}
    | {"ip6-localhost", "ip6-loopback"}
)

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_MAX_HOST_IN_MESSAGE: Final = 255


def _normalize_name(host: str) -> str:
    name = host.strip().lower().rstrip(".")
    if name.isascii():
        return name
    try:
        # The same IDNA (UTS 46) encoding yarl gives the URL's raw_host.
        raw = URL.build(scheme="http", host=name).raw_host
    except ValueError:
        return name
    return (raw or name).lower()


def _shown(host: str) -> str:
    if len(host) <= _MAX_HOST_IN_MESSAGE:
        return host
    return host[:_MAX_HOST_IN_MESSAGE] + "…"


def _denied(message: str) -> TransportError:
    return TransportError(message, code=ErrorCode.EGRESS_DENIED, retryable=False)


@dataclass(frozen=True, slots=True)
class _AllowList:
    names: frozenset[str]
    suffixes: tuple[str, ...]  # from "*.example.com", stored as ".example.com"
    networks: tuple[IPNetwork, ...]


def _parse_allow(entries: Iterable[str]) -> _AllowList:
    names: set[str] = set()
    suffixes: list[str] = []
    networks: list[IPNetwork] = []
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        text = entry.lower()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        try:
            networks.append(ipaddress.ip_network(text, strict=True))
            continue
        except ValueError as exc:
            if "/" in text or ":" in text:
                raise ValueError(f"egress allow-list entry {entry!r}: {exc}") from None
        wildcard = text.startswith("*.")
        name = text[2:] if wildcard else text
        name = name.rstrip(".")
        labels = name.split(".")
        if not name or not name.isascii() or not all(_LABEL.fullmatch(lb) for lb in labels):
            raise ValueError(
                f"egress allow-list entry {entry!r} is not a host name, IP address or CIDR"
                " (write international names in their xn-- form)"
            )
        if NUMERIC_LABEL.fullmatch(labels[-1]):
            raise ValueError(
                f"egress allow-list entry {entry!r}: write IPv4 addresses as a dotted quad"
            )
        if wildcard:
            suffixes.append("." + name)
        else:
            names.add(name)
    return _AllowList(frozenset(names), tuple(suffixes), tuple(networks))


class EgressPolicy:
    """The default deny list plus the operator's allow list; immutable (but for a memo of the
    URL hosts that passed) and shareable."""

    def __init__(self, allow: Sequence[str] = ()) -> None:
        if isinstance(allow, str):
            # A bare string would be read character by character.
            raise TypeError("allow must be a sequence of entries, not a string")
        self._allow = _parse_allow(allow)
        # URL hosts that passed ``check_url_host``: the answer for a host string never changes
        # under one policy, and parsing an address literal was most of each request's check.
        self._passed: set[str] = set()

    @classmethod
    def from_setting(cls, value: str | None) -> EgressPolicy:
        """Parse ``RUNNER_EGRESS_ALLOW`` (comma-separated; empty or None allows nothing)."""
        return cls(tuple((value or "").split(",")))

    def host_allowed(self, host: str) -> bool:
        """Whether ``host`` (a name, not an address) is on the allow list."""
        name = _normalize_name(host)
        return name in self._allow.names or any(name.endswith(s) for s in self._allow.suffixes)

    def denial_reason(self, ip: IPAddress) -> str | None:
        """Why ``ip`` is refused under this policy, or None when it may be reached."""
        if isinstance(ip, ipaddress.IPv6Address):
            ip = without_scope(ip)
        candidates: tuple[IPAddress, ...] = (ip,)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            # The kernel connects ::ffff:a.b.c.d to a.b.c.d, so an IPv4 allow entry covers it.
            candidates = (ip, ip.ipv4_mapped)
        if any(c in net for c in candidates for net in self._allow.networks):
            return None
        return address_denial_reason(ip)

    def check_address(self, ip: str, *, host: str | None = None) -> None:
        """Raise EGRESS_DENIED unless the resolved address ``ip`` of ``host`` may be reached."""
        if host is not None and not _is_literal(host) and self.host_allowed(host):
            return
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            shown = _shown(host if host is not None else ip)
            raise _denied(f"{shown} did not resolve to an IP address") from None
        reason = self.denial_reason(address)
        if reason is None:
            return
        if host is None or _is_literal(host):
            shown = host if host is not None else ip
            raise _denied(_literal_message(shown, address, reason))
        raise _denied(f"{_shown(host)} resolves to {address}, which is {reason}")

    def check_url_host(self, host: str) -> None:
        """Check a URL's host before the request is sent.

        IP literals in any spelling are normalized and checked here, because aiohttp connects
        to them without asking the resolver. Names pass (their addresses are checked when the
        resolver answers), except loopback names such as ``localhost`` and ``*.localhost``
        that are not allow-listed.
        """
        if host in self._passed:
            return
        self._check_url_host(host)
        if len(self._passed) >= 4096:
            self._passed.clear()
        self._passed.add(host)

    def _check_url_host(self, host: str) -> None:
        try:
            address = parse_ip_literal(host)
        except ValueError as exc:
            raise _denied(f"{_shown(host)} {exc}") from None
        if address is not None:
            reason = self.denial_reason(address)
            if reason is not None:
                raise _denied(_literal_message(host, address, reason))
            return
        name = _normalize_name(unquote(host))
        if not name:
            raise _denied("the URL has no host")
        if self.host_allowed(name):
            return
        if name in _LOOPBACK_NAMES or name.endswith(".localhost"):
            raise _denied(f"{_shown(host)} is a loopback name")


def _is_literal(host: str) -> bool:
    try:
        return parse_ip_literal(host) is not None
    except ValueError:
        return True


def _literal_message(host: str, address: IPAddress, reason: str) -> str:
    if host.strip("[]").lower() == str(address):
        return f"{address} is {reason}"
    return f"{_shown(host)} ({address}) is {reason}"


class GuardedResolver(AbstractResolver):
    """Resolve with ``inner`` and keep only the addresses the policy allows.

    aiohttp connects to exactly the addresses returned here, so the check and the connection
    see the same answer. Raises EGRESS_DENIED when no address is left.
    """

    def __init__(self, policy: EgressPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        # DefaultResolver binds the running loop; like TCPConnector, build this inside one.
        self._inner: AbstractResolver = inner if inner is not None else aiohttp.DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        # The same up-front check as the client's, for hexadecimal and other spellings that
        # aiohttp does not recognise as literals and getaddrinfo would still accept.
        self._policy.check_url_host(host)
        results = await self._inner.resolve(host, port, family)
        allowed: list[ResolveResult] = []
        first_denial: TransportError | None = None
        for result in results:
            try:
                self._policy.check_address(result["host"], host=host)
            except TransportError as exc:
                first_denial = first_denial or exc
                continue
            allowed.append(result)
        if first_denial is not None and not allowed:
            raise first_denial
        if not allowed:
            # Not a policy decision: an OSError lets aiohttp report it as the DNS failure it
            # is (ClientConnectorDNSError), where an empty list would trip an assertion.
            raise OSError(f"{_shown(host)} resolved to no address")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def egress_middleware(policy: EgressPolicy) -> ClientMiddlewareType:
    """An aiohttp client middleware that checks each request's host, redirect hops included."""

    async def check_host(request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        # raw_host is the string the connector resolves or connects to.
        policy.check_url_host(request.url.raw_host or "")
        return await handler(request)

    return check_host


def egress_error(exc: BaseException) -> TransportError | None:
    """The EGRESS_DENIED error in ``exc`` or anything it wraps, else None."""
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, TransportError) and current.code == ErrorCode.EGRESS_DENIED:
            return current
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
    return None
