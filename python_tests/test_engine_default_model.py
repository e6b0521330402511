"""moa_engine.Engine on the real default model, SmolLM2-135M-Instruct, served from its Q4_1
GGUF file as it is, against HF transformers loading the file's float32 conversion (the same
dequantized weights): greedy chat generation token for token, forward logits, stream()
against generate(), stop strings, and peak memory while loading.

One Engine and one HF model are shared by the module (each takes seconds to load).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import moa_engine
from moa_engine import models

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "What is 東京?",  # answers with CJK characters split over several tokens
    "Reply with three emojis.",  # emojis; the 28th token ends inside one
]
FLOAT32_REL_TOL = 1e-4


@pytest.fixture(scope="module")
def folder():
    return models.default_model_dir(progress=False)


@pytest.fixture(scope="module")
def engine(folder):
    engine = moa_engine.Engine(max_batch=4, max_seq_len=512)
    assert engine.model_path == models.default_gguf_path().resolve() and engine.quantized
    assert engine.dtype == torch.float32
    return engine


@pytest.fixture(scope="module")
def hf(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(folder))


def chat_ids(tokenizer, text):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def hf_greedy(model, prompt_ids, max_new_tokens):
    """HF greedy generation for one unpadded prompt, stopping at the model's EOS."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


@pytest.fixture(scope="module")
def chat_outputs(engine):
    """The engine's greedy completions of CHAT_PROMPTS, in one batch."""
    return engine.generate(CHAT_PROMPTS, chat=True, max_new_tokens=28)


def test_greedy_chat_matches_hf_generate(chat_outputs, engine, hf):
    model, tokenizer = hf
    eos = engine.config["eos_token_ids"]
    for text, c in zip(CHAT_PROMPTS, chat_outputs):
        prompt = chat_ids(tokenizer, text)
        assert c.prompt_token_ids == prompt
        assert c.token_ids == hf_greedy(model, prompt, 28), text
        assert c.finish_reason == ("stop" if c.token_ids[-1] in eos else "length")
        assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_plain_text_prompt_matches_hf_generate(engine, hf):
    model, tokenizer = hf
    text = "The three primary colors are"
    [c] = engine.generate([text], max_new_tokens=20, ignore_eos=True)
    prompt = tokenizer(text)["input_ids"]
    assert c.prompt_token_ids == prompt
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None)
    assert c.token_ids == out[0, len(prompt) :].tolist()


def test_capital_of_france_is_paris(chat_outputs):
    c = chat_outputs[0]
    assert "Paris" in c.text, c.text


def test_forward_matches_hf(engine, hf):
    model, tokenizer = hf
    prompt = chat_ids(tokenizer, CHAT_PROMPTS[1])
    ids = torch.tensor([prompt, prompt[::-1]])  # [2, T]: a chat prompt and the same tokens reversed
    got = engine.forward(ids)
    with torch.no_grad():
        ref = model(ids).logits
    err = float((got.double() - ref.double()).abs().max() / ref.double().abs().max())
    assert err <= FLOAT32_REL_TOL, f"relative error {err:.2e}"
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_stream_joins_to_the_generated_text(engine, chat_outputs):
    for text, c in zip(CHAT_PROMPTS[1:], chat_outputs[1:]):
        pieces = list(engine.stream(text, chat=True, max_new_tokens=28))
        assert all(pieces), "stream yielded an empty piece"
        assert "".join(pieces) == c.text, text
        # An incomplete multi-byte character is held back until its last token comes
        # (only the last piece may end inside one, when generation stops there).
        assert not any("\ufffd" in piece for piece in pieces[:-1]), pieces
    assert engine._core.idle()


def stop_cases(c, tokenizer):
    """Stop strings taken from a completion: (stop, expected text, expected token ids)."""
    cases = []
    text = c.text
    for word in text.split()[2:5]:
        stop = word.strip(".,!?;:")
        if not stop:
            continue
        cut = text.index(stop)
        # The tokens up to the one that completes the first occurrence of the stop string.
        ids = c.token_ids
        n = next(i for i in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:i], skip_special_tokens=True))
        cases.append((stop, text[:cut], c.token_ids[:n]))
    assert cases
    return cases


def test_stop_string_cuts_the_text(engine, chat_outputs, hf):
    _, tokenizer = hf
    for c, prompt in zip(chat_outputs[:2], CHAT_PROMPTS[:2]):
        for stop, want_text, want_ids in stop_cases(c, tokenizer):
            [got] = engine.generate([prompt], chat=True, max_new_tokens=28, stop=stop)
            assert (got.text, got.token_ids, got.finish_reason) == (want_text, want_ids, "stop"), stop
            # Several stop strings: the earliest wins.
            [got] = engine.generate([prompt], chat=True, max_new_tokens=28, stop=["\u2603never", stop])
            assert got.text == want_text and got.finish_reason == "stop"
    [paris] = engine.generate([CHAT_PROMPTS[0]], chat=True, max_new_tokens=28, stop="Paris")
    assert paris.text.endswith("is ") and "Paris" not in paris.text and paris.finish_reason == "stop"
    assert engine._core.idle()


def test_stream_with_a_stop_string(engine, chat_outputs, hf):
    _, tokenizer = hf
    c = chat_outputs[1]
    for stop, want_text, _ in stop_cases(c, tokenizer):
        assert "".join(engine.stream(CHAT_PROMPTS[1], chat=True, max_new_tokens=28, stop=stop)) == want_text
        # A stream stopped by a stop string may leave its request running (see the next
        # test); finish it so the module's shared engine starts the next test idle.
        while not engine._core.idle():
            engine._core.step()


def test_stream_with_a_stop_string_frees_its_request(folder):
    """When stream() ends at a stop string, its request is finished in the engine too: no
    request keeps decoding (and holding a KV-cache slot) after the caller got its text."""
    engine = moa_engine.Engine(folder, max_batch=1, max_seq_len=128)
    text = "".join(engine.stream(CHAT_PROMPTS[0], chat=True, max_new_tokens=28, stop="Paris"))
    assert "Paris" not in text
    assert engine._core.idle(), "the stopped stream's request is still running"


def test_closing_a_stream_early_frees_its_slot(engine, chat_outputs):
    stream = engine.stream(CHAT_PROMPTS[1], chat=True, max_new_tokens=28)
    first = next(stream)
    assert chat_outputs[1].text.startswith(first)
    stream.close()
    assert engine._core.idle()
    [again] = engine.generate([CHAT_PROMPTS[1]], chat=True, max_new_tokens=28)
    assert again.token_ids == chat_outputs[1].token_ids


def test_stream_in_a_thread_while_another_thread_generates(engine, chat_outputs):
    """stream() steps the engine while generate() runs its own requests from another thread:
    each gets the tokens it would get alone."""
    pieces, errors = [], []

    def consume():
        try:
            pieces.extend(engine.stream(CHAT_PROMPTS[1], chat=True, max_new_tokens=28))
        except Exception as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=consume)
    thread.start()
    got = engine.generate([CHAT_PROMPTS[2], CHAT_PROMPTS[0]], chat=True, max_new_tokens=28)
    thread.join(timeout=300)
    assert not errors and not thread.is_alive()
    assert "".join(pieces) == chat_outputs[1].text
    assert [c.token_ids for c in got] == [chat_outputs[2].token_ids, chat_outputs[0].token_ids]
    assert engine._core.idle()


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, re, sys

    def status(key):
        text = open("/proc/self/status").read()
        return int(re.search(key + r":\\s+(\\d+) kB", text).group(1)) * 1024

    import torch, moa_engine
    from moa_engine import _C
    baseline = status("VmRSS")
    if sys.argv[1] == "engine":
        engine = moa_engine.Engine(max_batch=1, max_seq_len=256)
    else:
        engine = _C.Engine(sys.argv[2], max_batch=1, max_seq_len=256)
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "weight_bytes": engine.weight_bytes}))
    """
)


def peak_load_memory(which, folder):
    """(peak RSS - RSS after `import torch, moa_engine`, weight_bytes) of loading the default
    model in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, which, str(folder)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    return m["peak"] - m["baseline"], m["weight_bytes"]


@pytest.mark.slow
def test_loading_peak_memory_is_within_1_3x_the_gguf_file(folder):
    """Engine() (its Q4_1 weights and KV cache; the tokenizer loads on first use) peaks within
    1.3x the GGUF file's size plus the KV cache."""
    extra, weight_bytes = peak_load_memory("engine", folder)
    file_bytes = models.default_gguf_path().stat().st_size
    assert weight_bytes <= file_bytes
    kv_bytes = 30 * 2 * 3 * 256 * 64 * 4  # layers, k and v, kv heads, max_seq_len, head dim, float32
    mib = 2**20
    assert extra <= 1.3 * file_bytes + kv_bytes, (
        f"peak {extra / mib:.0f} MiB above the baseline = {extra / file_bytes:.2f}x the {file_bytes / mib:.0f} MiB file"
    )


@pytest.mark.slow
def test_weight_loading_does_not_hold_the_file_and_the_copy(folder):
    """The C++ load copies each memory-mapped tensor and releases its pages: peak about 1x."""
    extra, weight_bytes = peak_load_memory("core", folder)
    assert extra <= 1.1 * weight_bytes, f"peak {extra / 2**20:.0f} MiB = {extra / weight_bytes:.2f}x the weights"
