"""The data layer: the JSONL record format, domain corpora built from installed packages, and
the cached train/val build."""

from .build import build_corpora, default_cache_dir
from .cli import add_data_subcommand
from .corpora import CORPORA, Corpus, CorpusUnavailable
from .records import Record, domains_of, read_records, split_records, write_records

__all__ = [
    "CORPORA",
    "Corpus",
    "CorpusUnavailable",
    "Record",
    "add_data_subcommand",
    "build_corpora",
    "default_cache_dir",
    "domains_of",
    "read_records",
    "split_records",
    "write_records",
]
