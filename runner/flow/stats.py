"""What flow control measured in this process, per connection: time waited for budget (by
what was waited for), budgets the APIs lowered, and the breaker state last seen. Read by the
telemetry's observable instruments at each collection (``runner.telemetry.instruments``)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}
"""``workflow.flow.breaker.state``'s values."""


@dataclass
class FlowStats:
    wait_ms: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    waits: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    adaptations: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    breaker: dict[str, str] = field(default_factory=dict)

    def waited(self, connection: str, reason: str, wait_ms: int) -> None:
        self.wait_ms[(connection, reason)] += max(wait_ms, 0)
        self.waits[(connection, reason)] += 1

    def adapted(self, connection: str, how: str) -> None:
        self.adaptations[(connection, how)] += 1

    def breaker_seen(self, connection: str, state: str) -> None:
        self.breaker[connection] = state
