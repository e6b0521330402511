"""`moa generate` as a user runs it, on the embedded default model."""

import json
import subprocess
import sys

import pytest


def run_moa(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "moa_engine.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_generate_streams_one_prompt():
    out = run_moa("generate", "What is the capital of France?", "--max-new-tokens", "16")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


@pytest.mark.slow
def test_generate_json_batch_from_stdin():
    prompts = "What is the capital of France?\nName a primary color.\n"
    out = run_moa("generate", "--json", "--max-new-tokens", "8", "--max-batch", "1", stdin=prompts)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["prompt"] for r in records] == prompts.splitlines()
    for r in records:
        assert r["finish_reason"] in ("stop", "length")
        assert 1 <= len(r["token_ids"]) <= 8
        assert isinstance(r["text"], str)


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "hi", "--max-new-tokens", "0"], "max_new_tokens must be > 0"),
        (["generate", "hi", "--max-new-tokens", "5000"], "exceeds max_seq_len"),
        (["generate", "hi", "--model", "/nonexistent/model"], "/nonexistent/model"),
    ],
)
@pytest.mark.slow
def test_generate_errors_are_one_line(args, message):
    out = run_moa(*args)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr
