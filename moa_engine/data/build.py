"""Build the training data: chosen corpora -> dedup -> deterministic shuffle -> cap per domain
-> train/val split -> out_dir/{train.jsonl, val.jsonl, manifest.json}, cached.

The cache entry is keyed by the arguments, the format version and the installed version of
every source, so a second call with the same arguments copies the cached files (fast) and a
package upgrade rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys

from moa_engine._io import atomic_copy, atomic_write_json, atomic_write_text
from moa_engine.models import cache_root

from .corpora import CORPORA, CorpusUnavailable
from .records import Record, records_to_jsonl, split_records

FORMAT_VERSION = 1  # bump when the output of a build changes for the same arguments
OUTPUT_FILES = ("train.jsonl", "val.jsonl", "manifest.json")  # manifest last: it marks completeness


def default_cache_dir() -> str:
    """The data cache: $MOA_ENGINE_CACHE/data, else ~/.cache/moa_engine/data.
    ($MOA_ENGINE_CACHE is moa_engine's cache root, shared with the converted default model.)"""
    return os.path.join(cache_root(), "data")


def parse_domains(domains) -> list[str] | None:
    """None, a comma-separated string or a list of names -> a checked list of names (or None)."""
    if domains is None:
        return None
    if isinstance(domains, str):
        domains = domains.split(",")
    names = [d.strip() for d in domains if d.strip()]
    if not names:
        raise ValueError("no domains given")
    unknown = [d for d in names if d not in CORPORA]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; known domains: {list(CORPORA)}")
    duplicated = sorted({d for d in names if names.count(d) > 1})
    if duplicated:
        raise ValueError(f"domain(s) {duplicated} given more than once")
    return names


def resolve_domains(domains) -> tuple[list[str], dict[str, str]]:
    """(domains to build, {skipped optional domain: reason}). With no list, every corpus is
    chosen, and an optional one whose source is absent is skipped rather than an error."""
    names = parse_domains(domains)
    if names is not None:
        return names, {}
    chosen, skipped = [], {}
    for name, corpus in CORPORA.items():
        if corpus.optional and corpus.version() is None:
            skipped[name] = f"source not installed ({corpus.source})"
        else:
            chosen.append(name)
    return chosen, skipped


def _cache_key(domains, max_per_domain, seed, val_fraction, sources) -> str:
    blob = json.dumps(
        {
            "format": FORMAT_VERSION,
            "domains": domains,
            "max_per_domain": max_per_domain,
            "seed": seed,
            "val_fraction": val_fraction,
            "sources": sources,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _cache_complete(entry: str) -> bool:
    return all(os.path.isfile(os.path.join(entry, name)) for name in OUTPUT_FILES)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rec", disable=not enabled, leave=False, file=sys.stderr)


def collect_domain(name: str, max_per_domain: int, seed: int, progress: bool = False) -> list[Record]:
    """Up to max_per_domain distinct records of one domain, in a seeded order."""
    records: dict[str, Record] = {}
    with _progress(max_per_domain, name, progress) as bar:
        for record in CORPORA[name](max_per_domain, seed):
            if record.domain != name:
                raise RuntimeError(f"corpus {name!r} produced a record of domain {record.domain!r}")
            if record.content_key() not in records:
                records[record.content_key()] = record
                bar.update(1)
    ordered = sorted(records.values(), key=lambda r: r.content_key())  # independent of build order
    random.Random(f"{name}:{seed}").shuffle(ordered)
    return ordered[:max_per_domain]


def build_corpora(
    out_dir,
    domains=None,
    max_per_domain: int = 2000,
    seed: int = 0,
    cache_dir=None,
    val_fraction: float = 0.05,
    progress: bool = True,
) -> dict:
    """Build the chosen domains into out_dir/train.jsonl, val.jsonl and manifest.json.

    domains: None (every corpus, optional ones only when installed), a list of names, or a
    comma-separated string. Returns the manifest plus "cache_hit", "cache_entry" and "out_dir".
    Raises CorpusUnavailable when a chosen corpus's source is missing.
    """
    if max_per_domain < 1:
        raise ValueError(f"max_per_domain must be >= 1, got {max_per_domain}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    names, skipped = resolve_domains(domains)
    for name, reason in skipped.items():
        print(f"moa data: skipping optional domain {name!r}: {reason}", file=sys.stderr)
    sources = {name: CORPORA[name].describe() for name in names}

    key = _cache_key(names, max_per_domain, seed, val_fraction, sources)
    entry = os.path.join(os.fspath(cache_dir) if cache_dir is not None else default_cache_dir(), key)
    cache_hit = _cache_complete(entry)
    if not cache_hit:
        _build_into(entry, names, skipped, sources, max_per_domain, seed, val_fraction, progress)

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    for name in OUTPUT_FILES:
        atomic_copy(os.path.join(entry, name), os.path.join(out_dir, name))
    with open(os.path.join(out_dir, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    return {**manifest, "cache_hit": cache_hit, "cache_entry": entry, "out_dir": out_dir}


def _build_into(entry, names, skipped, sources, max_per_domain, seed, val_fraction, progress) -> None:
    records: list[Record] = []
    for name in names:
        records.extend(collect_domain(name, max_per_domain, seed, progress))
    train, val = split_records(records, val_fraction=val_fraction, seed=seed)
    counts = {
        name: {
            "train": sum(r.domain == name for r in train),
            "val": sum(r.domain == name for r in val),
        }
        for name in names
    }
    for c in counts.values():
        c["total"] = c["train"] + c["val"]
    manifest = {
        "format": FORMAT_VERSION,
        "domains": names,
        "counts": counts,
        "total": {"train": len(train), "val": len(val)},
        "sources": sources,
        "skipped": skipped,
        "seed": seed,
        "max_per_domain": max_per_domain,
        "val_fraction": val_fraction,
        "python": sys.version.split()[0],
    }
    os.makedirs(entry, exist_ok=True)
    atomic_write_text(os.path.join(entry, "train.jsonl"), records_to_jsonl(train))
    atomic_write_text(os.path.join(entry, "val.jsonl"), records_to_jsonl(val))
    atomic_write_json(os.path.join(entry, "manifest.json"), manifest)


__all__ = ["build_corpora", "collect_domain", "default_cache_dir", "parse_domains", "CorpusUnavailable"]
