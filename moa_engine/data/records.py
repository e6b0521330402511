"""The JSONL training-record format: the one place that defines it.

One record per line, one of two kinds:

    {"domain": str, "prompt": str, "response": str}   chat-style; loss on response tokens only
    {"domain": str, "text": str}                      plain language modelling

Every value is a non-empty string (not only whitespace). No other fields are allowed, and one
record never mixes prompt/response with text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from moa_engine._io import atomic_write_text

CHAT_FIELDS = ("domain", "prompt", "response")
TEXT_FIELDS = ("domain", "text")
ALL_FIELDS = ("domain", "prompt", "response", "text")


def record_problem(obj) -> str | None:
    """Why `obj` (a parsed JSON value) is not a valid record, or None when it is one."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    unknown = sorted(set(obj) - set(ALL_FIELDS))
    if unknown:
        return f"unknown field(s) {unknown}; allowed fields are {list(ALL_FIELDS)}"
    if "text" in obj and ("prompt" in obj or "response" in obj):
        return "mixes 'text' with 'prompt'/'response'; a record is either chat-style or plain text"
    expected = TEXT_FIELDS if "text" in obj else CHAT_FIELDS
    missing = [f for f in expected if f not in obj]
    if missing:
        kinds = f"{list(CHAT_FIELDS)} or {list(TEXT_FIELDS)}"
        return f"missing field(s) {missing}; a record has the fields {kinds}"
    for name in expected:
        value = obj[name]
        if not isinstance(value, str):
            return f"field {name!r} must be a string, got {type(value).__name__} ({value!r:.40})"
        if not value.strip():
            return f"field {name!r} is an empty string"
    return None


@dataclass(frozen=True)
class Record:
    """One training example: chat-style (prompt, response) or plain text. Validated on creation."""

    domain: str
    prompt: str | None = None
    response: str | None = None
    text: str | None = None

    def __post_init__(self):
        problem = record_problem(self.to_dict())
        if problem is not None:
            raise ValueError(f"invalid record: {problem}")

    @property
    def is_chat(self) -> bool:
        return self.text is None

    def to_dict(self) -> dict:
        """The record's JSON object, with only the fields of its kind."""
        return {name: getattr(self, name) for name in ALL_FIELDS if getattr(self, name) is not None}

    @classmethod
    def from_dict(cls, obj: dict) -> Record:
        problem = record_problem(obj)
        if problem is not None:
            raise ValueError(f"invalid record: {problem}")
        return cls(**obj)

    def content_key(self) -> str:
        """A stable hash of the record's content (same in every process and Python version)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading and writing
# ---------------------------------------------------------------------------------------------


def read_records(path) -> list[Record]:
    """Read a JSONL file of records. Blank lines are skipped. Any other bad line raises a
    ValueError naming the file, the 1-based line number and the problem."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            problem = record_problem(obj)
            if problem is not None:
                raise ValueError(f"{path}:{lineno}: {problem}")
            records.append(Record(**obj))
    return records


def records_to_jsonl(records: Iterable[Record]) -> str:
    return "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records)


def write_records(path, records: Iterable[Record]) -> None:
    """Write records as JSONL, atomically (moa_engine._io)."""
    atomic_write_text(path, records_to_jsonl(records))


# ---------------------------------------------------------------------------------------------
# Domains and the train/validation split
# ---------------------------------------------------------------------------------------------


def domains_of(records: Iterable[Record], expected: Sequence[str] | None = None) -> list[str]:
    """The domains of `records` in first-seen order.

    With `expected` (a requested domain list), return it instead, after checking that every
    expected domain has at least one record and that no record has a domain outside it.
    """
    seen = list(dict.fromkeys(r.domain for r in records))
    if expected is None:
        return seen
    expected = list(expected)
    empty = [d for d in expected if d not in seen]
    if empty:
        raise ValueError(f"domain(s) {empty} have zero records; domains with records: {seen}")
    extra = [d for d in seen if d not in expected]
    if extra:
        raise ValueError(f"records have domain(s) {extra} outside the requested domains {expected}")
    return expected


def _split_score(record: Record, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) from the record's content and the seed."""
    digest = hashlib.sha256(f"{seed}:{record.content_key()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_records(records: Sequence[Record], val_fraction: float = 0.05, seed: int = 0):
    """Split records into (train, val), both in input order.

    Semantics: record r goes to val iff score(seed, content(r)) < val_fraction, where score is a
    stable hash in [0, 1). Adding records therefore never moves existing ones, except in the
    fix-ups for tiny domains: a domain with >= 2 records and no val record sends its
    lowest-scoring record to val, and one with every record in val keeps its highest-scoring
    record in train. Identical records always land on the same side.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    scores = [_split_score(r, seed) for r in records]
    in_val = [s < val_fraction for s in scores]
    by_domain: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_domain.setdefault(r.domain, []).append(i)
    for indices in by_domain.values():
        if len({records[i].content_key() for i in indices}) < 2:
            continue  # one distinct record: it cannot be on both sides
        if not any(in_val[i] for i in indices):
            lowest = min(indices, key=lambda i: scores[i])
            for i in indices:
                in_val[i] = records[i] == records[lowest]
        if all(in_val[i] for i in indices):
            highest = max(indices, key=lambda i: scores[i])
            for i in indices:
                in_val[i] = records[i] != records[highest]
    train = [r for r, v in zip(records, in_val) if not v]
    val = [r for r, v in zip(records, in_val) if v]
    return train, val
