"""The bounded buffer of execution log documents, and its drop policy.

When the buffer is full, the oldest line of the lowest level present goes (a new line below every
buffered level is dropped itself). Drops are counted per run and come out of the next ``take``
as one warning document per run, placed in that run's timeline where the loss happened.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from bson import ObjectId

from runner.reporting.execlog.documents import LEVEL_RANK, LEVELS, Document


@dataclass(slots=True)
class Entry:
    seq: int
    rank: int
    doc: Document


@dataclass(slots=True)
class _Drops:
    by_level: dict[str, int] = field(default_factory=dict)
    last_doc: Document | None = None


class LogBuffer:
    """FIFO of documents, at most ``limit``; when full, the oldest line of the lowest level goes.

    Drops are counted per run; the next ``take`` turns each run's count into one warning line,
    so whoever reads that run's logs sees that lines are missing and how many.
    """

    def __init__(self, limit: int) -> None:
        self._limit = max(1, limit)
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        # Per level, the seqs of its entries in the same order as ``_entries``.
        self._by_rank: list[deque[int]] = [deque() for _ in LEVELS]
        self._seq = 0
        self._drops: dict[tuple[str, str], _Drops] = {}
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries) or bool(self._drops)

    def add(self, doc: Document) -> None:
        self._seq += 1
        entry = Entry(self._seq, LEVEL_RANK.get(doc["level"], 1), doc)
        if len(self._entries) >= self._limit:
            lowest = self._lowest_rank()
            if lowest is None or entry.rank < lowest:
                self._count_drop(entry.doc)
                return
            self._drop_oldest(lowest)
        self._entries[entry.seq] = entry
        self._by_rank[entry.rank].append(entry.seq)

    def take(self, count: int) -> list[Entry]:
        batch = self._drop_warnings()
        while self._entries and len(batch) < count:
            _, entry = self._entries.popitem(last=False)
            self._by_rank[entry.rank].popleft()
            batch.append(entry)
        return batch

    def put_back(self, batch: list[Entry]) -> None:
        """Return a batch that was not written to the front, then enforce the limit again."""
        for entry in reversed(batch):
            self._entries[entry.seq] = entry
            self._entries.move_to_end(entry.seq, last=False)
            self._by_rank[entry.rank].appendleft(entry.seq)
        while len(self._entries) > self._limit:
            lowest = self._lowest_rank()
            assert lowest is not None  # non-empty buffer
            self._drop_oldest(lowest)

    def documents(self) -> list[Document]:
        return [entry.doc for entry in self._entries.values()]

    def _lowest_rank(self) -> int | None:
        return next((rank for rank, seqs in enumerate(self._by_rank) if seqs), None)

    def _drop_oldest(self, rank: int) -> None:
        entry = self._entries.pop(self._by_rank[rank].popleft())
        self._count_drop(entry.doc)

    def _count_drop(self, doc: Document) -> None:
        self.dropped += 1
        drops = self._drops.setdefault((doc["tenantId"], doc["workflowRunId"]), _Drops())
        drops.by_level[doc["level"]] = drops.by_level.get(doc["level"], 0) + 1
        if drops.last_doc is None or doc["timestamp"] >= drops.last_doc["timestamp"]:
            drops.last_doc = doc

    def _drop_warnings(self) -> list[Entry]:
        batch: list[Entry] = []
        for drops in self._drops.values():
            last = drops.last_doc
            assert last is not None  # set with the first count
            total = sum(drops.by_level.values())
            self._seq += 1
            doc: Document = {
                "_id": ObjectId(),
                "tenantId": last["tenantId"],
                "workflowRunId": last["workflowRunId"],
                "stepRunId": None,
                "stepKey": None,
                "attempt": None,
                "level": "warning",
                "message": f"{total} log lines dropped: execution log buffer full",
                "context": {"dropped": total, "byLevel": dict(drops.by_level)},
                # Placed where the loss happened in the run's timeline.
                "timestamp": last["timestamp"],
                "jobId": last["jobId"],
                "workerId": last["workerId"],
            }
            batch.append(Entry(self._seq, LEVEL_RANK["warning"], doc))
        self._drops.clear()
        return batch
