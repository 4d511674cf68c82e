"""What an IP address is, in every spelling a URL can give it: the ranges the default egress
policy refuses and why (``address_denial_reason``), and the host strings that denote an address
(``parse_ip_literal``: brackets, IPv6 zones, percent-escapes and every inet_aton form of IPv4).

Pure functions of their argument, with no policy and no I/O: ``runner.http.egress`` builds the
policy, the resolver and the checks on top of them.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final
from urllib.parse import unquote

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

__all__ = [
    "NUMERIC_LABEL",
    "IPAddress",
    "IPNetwork",
    "address_denial_reason",
    "parse_ip_literal",
    "without_scope",
]

# The last label of a host that can only be an IPv4 address (no real name ends in a number).
NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_HEX = re.compile(r"[0-9a-f]*")
_OCT = re.compile(r"[0-7]+")
_DEC = re.compile(r"[0-9]+")

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

# First match wins, so the more specific ranges (broadcast inside 240/4, unspecified inside
# 0/8) come first and name the better reason.
_DENIED_V4: Final[tuple[tuple[ipaddress.IPv4Network, str], ...]] = (
    (_V4("0.0.0.0/32"), "unspecified"),
    (_V4("0.0.0.0/8"), "reserved ('this network')"),
    (_V4("10.0.0.0/8"), "private"),
    (_V4("100.64.0.0/10"), "carrier-grade NAT"),
    (_V4("127.0.0.0/8"), "loopback"),
    (_V4("169.254.0.0/16"), "link-local"),
    (_V4("172.16.0.0/12"), "private"),
    (_V4("192.0.0.0/24"), "reserved (IETF protocol assignments)"),
    (_V4("192.0.2.0/24"), "documentation (TEST-NET-1)"),
    (_V4("192.88.99.0/24"), "reserved (6to4 relay anycast)"),
    (_V4("192.168.0.0/16"), "private"),
    (_V4("198.18.0.0/15"), "benchmarking"),
    (_V4("198.51.100.0/24"), "documentation (TEST-NET-2)"),
    (_V4("203.0.113.0/24"), "documentation (TEST-NET-3)"),
    (_V4("224.0.0.0/4"), "multicast"),
    (_V4("255.255.255.255/32"), "broadcast"),
    (_V4("240.0.0.0/4"), "reserved"),
)

_MAPPED = _V6("::ffff:0:0/96")
_COMPATIBLE = _V6("::/96")
_NAT64 = _V6("64:ff9b::/96")
_SIXTOFOUR = _V6("2002::/16")
_GLOBAL_UNICAST = _V6("2000::/3")

# Checked in order after the embedded-IPv4 forms; anything left outside 2000::/3 is reserved.
_DENIED_V6: Final[tuple[tuple[ipaddress.IPv6Network, str], ...]] = (
    (_V6("::/128"), "unspecified"),
    (_V6("::1/128"), "loopback"),
    (_V6("ff00::/8"), "multicast"),
    (_V6("fe80::/10"), "link-local"),
    (_V6("fec0::/10"), "site-local (deprecated)"),
    (_V6("fc00::/7"), "private (unique local)"),
    (_V6("64:ff9b:1::/48"), "private (local-use NAT64)"),
    (_V6("100::/64"), "reserved (discard-only)"),
    (_V6("2001::/32"), "Teredo"),
    (_V6("2001:db8::/32"), "documentation"),
    (_V6("3fff::/20"), "documentation"),
    # Benchmarking, ORCHID and the other IETF protocol assignments.
    (_V6("2001::/23"), "reserved (IETF protocol assignments)"),
)


def address_denial_reason(ip: IPAddress) -> str | None:
    """Why the default policy refuses ``ip`` (``"loopback"``), or None if it is public."""
    if isinstance(ip, ipaddress.IPv4Address):
        for network, reason in _DENIED_V4:
            if ip in network:
                return reason
        return None
    ip = without_scope(ip)
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        kind, v4 = embedded
        inner = address_denial_reason(v4)
        if kind == "IPv4-compatible":
            # Deprecated (RFC 4291), with no legitimate destination: refuse it even when
            # the IPv4 part is public.
            return f"reserved (IPv4-compatible {v4}{f', {inner}' if inner else ''})"
        return None if inner is None else f"{inner} ({kind} {v4})"
    for network6, reason in _DENIED_V6:
        if ip in network6:
            return reason
    if ip not in _GLOBAL_UNICAST:
        return "reserved"
    return None


def without_scope(ip: ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(int(ip)) if ip.scope_id else ip


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    if ip in _MAPPED:
        return "IPv4-mapped", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _COMPATIBLE and int(ip) > 1:
        return "IPv4-compatible", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _NAT64:
        return "NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _SIXTOFOUR:
        return "6to4", ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF)
    return None


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a URL host denotes when it is an IP literal in any spelling, else None.

    Accepts what ``getaddrinfo`` would: brackets, an IPv6 zone (``%eth0`` or ``%25eth0``),
    trailing dots, percent-escapes and every inet_aton form of IPv4 (``2130706433``,
    ``0177.0.0.1``, ``0x7f.1``, ``127.1``). Raises ValueError for a host that looks numeric
    but is no valid address (``1.2.3.4.5``, ``08.0.0.1``): no real name ends in a number.
    """
    text = unquote(host).strip().lower()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        address, _, _zone = text.partition("%")
        try:
            return ipaddress.IPv6Address(address)
        except ValueError:
            raise ValueError("is not a valid IPv6 address") from None
    text = text.rstrip(".")
    last_label = text.rpartition(".")[2]
    if not text.isascii() or not NUMERIC_LABEL.fullmatch(last_label):
        return None
    value = _inet_aton(text)
    if value is None:
        raise ValueError("is not a valid IPv4 address")
    return ipaddress.IPv4Address(value)


def _inet_aton(text: str) -> int | None:
    # The BSD/glibc grammar: 1-4 parts; the last fills the remaining bytes.
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values: list[int] = []
    for part in parts:
        if part.startswith("0x"):
            if not _HEX.fullmatch(part[2:]):
                return None
            values.append(int(part[2:] or "0", 16))
        elif part.startswith("0") and len(part) > 1:
            if not _OCT.fullmatch(part):
                return None
            values.append(int(part, 8))
        elif _DEC.fullmatch(part):
            values.append(int(part))
        else:
            return None
    *head, last = values
    if any(v > 0xFF for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    result = 0
    for v in head:
        result = (result << 8) | v
    return (result << (8 * (4 - len(head)))) | last
