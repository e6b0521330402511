"""The JSONL training log: one record per optimizer step (trainer.train writes them), and records
of a stage's other events ({"stage": "keep-best", ...}, {"stage": "router-fit", ...})."""

from __future__ import annotations

import json
from pathlib import Path

from .trainer import TrainConfig, world


def append_log(cfg: TrainConfig, record: dict) -> None:
    """Add one record to cfg.log_path (on the first process only; no log path: nothing)."""
    if world()[0] == 0 and cfg.log_path:
        Path(cfg.log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(cfg.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def summary_from_log(log_path) -> dict:
    """What a finished run's summary says about its training, read back from its JSONL log:
    {"final": the last step's record (None without one), "kept": the "keep-best" record's kept
    steps (None when it was not early-stopped), "reused": True}. A missing log gives None for both.
    For reusing a finished run instead of training it again."""
    log_path = Path(log_path)
    final, kept = None, None
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            record = json.loads(line)
            if record.get("stage") == "keep-best":
                kept = record.get("kept")
            elif "step" in record:
                final = record
    return {"final": final, "kept": kept, "reused": True}
