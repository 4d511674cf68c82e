"""Whether telemetry is on, and where it exports, from the standard ``OTEL_*`` variables (pure).

``config_from_env`` reads only what decides that; the SDK itself reads the rest
(``OTEL_EXPORTER_OTLP_HEADERS``, ``..._TIMEOUT``, ``..._COMPRESSION``, certificates,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_PROPAGATORS``, ``OTEL_BSP_*``,
``OTEL_METRIC_EXPORT_INTERVAL``) from the process environment. Only OTLP over HTTP/protobuf is
shipped: a configuration that asks for gRPC, or for an exporter that is not installed, fails at
startup instead of losing data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

SERVICE_NAME_DEFAULT = "workflow-runner"
QUEUE_NAME_DEFAULT = "workflow-runs"

_SUPPORTED_TRACES_EXPORTERS = frozenset({"otlp", "console"})
_SUPPORTED_METRICS_EXPORTERS = frozenset({"otlp", "console"})
_SUPPORTED_PROTOCOLS = frozenset({"http/protobuf"})


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """What ``from_env`` builds. An endpoint is the full signal URL, or ``None`` when the signal
    has no OTLP exporter or none is configured (the SDK then uses its default)."""

    traces_exporters: tuple[str, ...]
    metrics_exporters: tuple[str, ...]
    traces_endpoint: str | None
    metrics_endpoint: str | None
    service_name: str | None


def _get(environ: Mapping[str, str], name: str) -> str | None:
    # The specification treats an empty value as unset.
    value = environ.get(name, "").strip()
    return value or None


def _exporters(
    environ: Mapping[str, str], name: str, default: tuple[str, ...], supported: frozenset[str]
) -> tuple[str, ...]:
    raw = _get(environ, name)
    if raw is None:
        return default
    names = tuple(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))
    if "none" in names:
        return ()
    unsupported = [n for n in names if n not in supported]
    if unsupported:
        raise ValueError(
            f"{name}={raw!r}: exporter {unsupported[0]!r} is not installed "
            f"(supported: {', '.join(sorted(supported))}, none)"
        )
    return names


def _signal_endpoint(environ: Mapping[str, str], signal: str) -> str | None:
    specific = _get(environ, f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    if specific is not None:
        return specific
    base = _get(environ, "OTEL_EXPORTER_OTLP_ENDPOINT")
    return None if base is None else f"{base.removesuffix('/')}/v1/{signal}"


def _check_protocol(environ: Mapping[str, str], signal: str) -> None:
    for name in (f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = _get(environ, name)
        if protocol is not None:
            if protocol.lower() not in _SUPPORTED_PROTOCOLS:
                raise ValueError(
                    f"{name}={protocol!r}: only http/protobuf is installed "
                    "(point the endpoint at the collector's OTLP/HTTP port, usually 4318)"
                )
            return


def config_from_env(environ: Mapping[str, str]) -> TelemetryConfig | None:
    """``None`` (off) unless ``OTEL_SDK_DISABLED`` is not ``true`` and an OTLP endpoint
    (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``..._TRACES_ENDPOINT``) is set or
    ``OTEL_TRACES_EXPORTER`` names an exporter. When on, traces go to ``OTEL_TRACES_EXPORTER``
    (default ``otlp``) and metrics to ``OTEL_METRICS_EXPORTER`` (default ``otlp`` when an endpoint
    for metrics is set, else none, so that a traces-only endpoint does not send metrics to the
    SDK's localhost default). ``none`` turns a signal off. Raises ``ValueError`` for a
    configuration this install cannot honour."""
    if (_get(environ, "OTEL_SDK_DISABLED") or "").lower() == "true":
        return None
    traces_exporter_set = _get(environ, "OTEL_TRACES_EXPORTER")
    triggered = (
        _get(environ, "OTEL_EXPORTER_OTLP_ENDPOINT") is not None
        or _get(environ, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") is not None
        or (traces_exporter_set is not None and traces_exporter_set.lower() != "none")
    )
    if not triggered:
        return None
    traces = _exporters(environ, "OTEL_TRACES_EXPORTER", ("otlp",), _SUPPORTED_TRACES_EXPORTERS)
    metrics_endpoint = _signal_endpoint(environ, "metrics")
    metrics_default: tuple[str, ...] = ("otlp",) if metrics_endpoint is not None else ()
    metrics = _exporters(
        environ, "OTEL_METRICS_EXPORTER", metrics_default, _SUPPORTED_METRICS_EXPORTERS
    )
    if not traces and not metrics:
        return None
    if "otlp" in traces:
        _check_protocol(environ, "traces")
    if "otlp" in metrics:
        _check_protocol(environ, "metrics")
    return TelemetryConfig(
        traces_exporters=traces,
        metrics_exporters=metrics,
        traces_endpoint=_signal_endpoint(environ, "traces") if "otlp" in traces else None,
        metrics_endpoint=metrics_endpoint if "otlp" in metrics else None,
        service_name=_get(environ, "OTEL_SERVICE_NAME"),
    )
