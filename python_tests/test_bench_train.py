"""Smoke test of benchmarks/train.py: --quick on a tiny random Llama, in a subprocess.

Checks that every system trains (finite losses), that the figures are consistent (tokens per
step, ratios to PEFT) and that the JSON and the plot are written. Timings are not checked.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from tiny_models import build_model, save_model

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "train.py"


def test_train_benchmark_quick_on_a_tiny_model(tmp_path):
    folder = save_model(build_model("llama_gqa", seed=0), tmp_path / "model")
    out = tmp_path / "results" / "train.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--model",
        str(folder),
        "--out",
        str(out),
        "--dtype",
        "float32,bfloat16",
        "--threads",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| dtype | system |" in proc.stdout and "ours (4 experts) / PEFT (1 adapter)" in proc.stdout

    payload = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    settings = payload["settings"]
    assert (settings["seq_len"], settings["batch"], settings["experts"]) == (32, 4, 4)
    rows = payload["rows"]
    assert [(r["dtype"], r["system"]) for r in rows] == [
        (d, s) for d in ("float32", "bfloat16") for s in ("PEFT", "ours", "ours_1")
    ]
    by = {(r["dtype"], r["system"]): r for r in rows}
    for r in rows:
        assert r["tokens_per_step"] == 4 * 32
        assert r["step"]["samples"] == settings["steps"] * settings["rounds"]
        assert r["tokens_per_s"] > 0 and math.isclose(r["tokens_per_s"], 128 / (r["step"]["median_ms"] / 1e3))
        losses = [x for rnd in r["loss_per_round"] for x in rnd]
        assert len(losses) == settings["warmup"] + settings["steps"] and all(map(math.isfinite, losses))
        peft = by[r["dtype"], "PEFT"]
        assert math.isclose(r["over_peft"], r["tokens_per_s"] / peft["tokens_per_s"])
    # One LoRA per projection on every system: the 4-expert model holds 4x the parameters.
    f32 = {s: by["float32", s]["trainable_parameters"] for s in ("PEFT", "ours", "ours_1")}
    assert f32["ours"] == 4 * f32["PEFT"] and f32["ours_1"] == f32["PEFT"]
    # Same data, same initialisation scheme (B = 0): the first step's loss is the base model's.
    first = {s: by["float32", s]["loss_per_round"][0][0] for s in ("PEFT", "ours", "ours_1")}
    assert math.isclose(first["ours"], first["PEFT"], rel_tol=1e-4)
    ratios = payload["ratios"]["float32"]
    assert math.isclose(ratios["ours_over_peft"], by["float32", "ours"]["over_peft"])
    assert isinstance(ratios["goal_met"], bool)
    assert torch.__version__ == payload["environment"]["torch"]
