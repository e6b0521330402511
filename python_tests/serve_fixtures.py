"""Fixtures and helpers for the `moa serve` tests (test_serve.py): a tiny chat model with the
default model's real tokenizer and chat template, random PEFT experts and a MoA directory with
random routers, live servers on loopback (`python -m moa_engine.cli serve` as a subprocess), the
in-process Engine as the solo reference, and a Prometheus /metrics reader.

Test modules import the fixtures:

    from serve_fixtures import tiny_chat, main_server  # noqa: F401  (fixtures)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import seeded_generator

HOST = "127.0.0.1"
READY = re.compile(r"moa serve: ready on (http://[^\s]+)")
READY_TIMEOUT_S = 120.0
MAX_SEQ_LEN = 16384  # the tiny servers' --max-seq-len: long enough for requests that outlast an event
EXPERTS = ["code", "math", "law"]  # the MoA directory's domains, in router order
MOA_NAME = "tiny-moa"  # the MoA directory's folder name: the served model name
MOA_STRATEGY = "per_layer"  # the MoA directory's routing strategy
N_LAYERS = 2
HIDDEN = 64
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

# Prompt material: words of several scripts, so the prompts tokenize to varied lengths.
WORDS = (
    "the capital of France is Paris and a river runs through it while people walk along quiet streets "
    "write a python function that sorts numbers matrix integral proof theorem contract court judge "
    "café naïve über résumé 東京 数学 法律 ∑ λ → 42 1987 3.14159 {json} <tag> snake_case CamelCase"
).split()


# ---------------------------------------------------------------------------------------------
# The tiny chat model, its experts and the MoA directory
# ---------------------------------------------------------------------------------------------


def build_tiny_chat_model(folder: Path, seed: int = 0) -> Path:
    """A random LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 kv heads) with the default
    model's vocabulary (49152), special ids and tokenizer files (its chat template included)."""
    from tiny_models import randomize_
    from transformers import AutoModelForCausalLM, LlamaConfig

    from moa_engine.models import resolve_model

    default = Path(resolve_model(None))
    default_config = json.loads((default / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=default_config["vocab_size"],
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_SEQ_LEN,
        bos_token_id=default_config["bos_token_id"],
        eos_token_id=default_config["eos_token_id"],
        pad_token_id=default_config.get("pad_token_id"),
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed)
    model.eval().save_pretrained(str(folder))
    for name in TOKENIZER_FILES:
        if (default / name).exists():
            shutil.copy(default / name, folder / name)
    return folder


def random_routers(gen: torch.Generator, n_domains: int, scale: float = 4.0) -> list[torch.Tensor]:
    """One [n_domains, hidden] float32 router per layer."""
    return [scale * torch.randn(n_domains, HIDDEN, generator=gen) for _ in range(N_LAYERS)]


@dataclass
class TinyChat:
    """The tiny model's folder, its experts' PEFT folders, the MoA directory, and spare adapters
    (not in the MoA directory) for the runtime-expert tests."""

    folder: Path
    experts: dict[str, Path]
    moa_dir: Path
    spare: dict[str, Path]
    _engines: dict = field(default_factory=dict, repr=False)

    def engine(self, kind: str = "moa"):
        """The in-process reference engine (cached): "moa" (the MoA directory, as the servers run
        it), or the name of a spare adapter (the model with only that expert)."""
        import moa_engine

        if kind not in self._engines:
            if kind == "moa":
                self._engines[kind] = moa_engine.Engine(experts=self.moa_dir, max_batch=4, max_seq_len=MAX_SEQ_LEN)
            else:
                self._engines[kind] = moa_engine.Engine(
                    model=self.folder, experts={kind: self.spare[kind]}, max_batch=4, max_seq_len=MAX_SEQ_LEN
                )
        return self._engines[kind]


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory, request) -> TinyChat:
    """Built once per session: the tiny chat model, three random experts (init_scale 1.0, so each
    visibly changes the greedy output), a MoA directory with random routers, two spare adapters."""
    from moa_engine.moa_format import MoAConfig, MoADir, RouterConfig
    from moa_engine.testing import make_random_peft_adapter

    root = tmp_path_factory.mktemp("serve")
    folder = build_tiny_chat_model(root / "tiny-chat", seed=11)
    experts = {
        name: make_random_peft_adapter(folder, root / "adapters" / name, r=r, seed=100 + i, init_scale=1.0)
        for i, (name, r) in enumerate(zip(EXPERTS, (4, 8, 5)))
    }
    spare = {
        name: make_random_peft_adapter(folder, root / "adapters" / name, r=6, seed=200 + i, init_scale=1.0)
        for i, name in enumerate(("extra", "extra2"))
    }
    gen = seeded_generator("serve_fixtures:tiny_chat")
    config = MoAConfig(
        base_model=os.path.relpath(folder, root / MOA_NAME),
        domains=list(EXPERTS),
        router=RouterConfig(strategy=MOA_STRATEGY),
    )
    moa_dir = MoADir.save(root / MOA_NAME, config, experts=experts, router=random_routers(gen, len(EXPERTS)))
    return TinyChat(folder=folder, experts=experts, moa_dir=Path(moa_dir), spare=spare)


# ---------------------------------------------------------------------------------------------
# Prompts and the solo reference
# ---------------------------------------------------------------------------------------------


def random_text(gen: torch.Generator, lo: int = 2, hi: int = 14) -> str:
    """A prompt of lo..hi random words."""
    n = int(torch.randint(lo, hi + 1, (), generator=gen))
    return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (n,), generator=gen))


def random_messages(gen: torch.Generator) -> list[dict]:
    """A chat: a user message, sometimes after a system message or a previous exchange."""
    kind = int(torch.randint(3, (), generator=gen))
    messages = []
    if kind == 1:
        messages.append({"role": "system", "content": random_text(gen, 2, 6)})
    if kind == 2:
        messages += [{"role": "user", "content": random_text(gen)}, {"role": "assistant", "content": random_text(gen)}]
    messages.append({"role": "user", "content": random_text(gen)})
    return messages


def odd(gen: torch.Generator, lo: int, hi: int) -> int:
    """A random odd number in [lo, hi]."""
    return int(torch.randint(lo // 2, (hi - 1) // 2 + 1, (), generator=gen)) * 2 + 1


def choose(gen: torch.Generator, items):
    items = list(items)
    return items[int(torch.randint(len(items), (), generator=gen))]


def domain_of_model(model: str):
    """The Engine.generate domain argument for an OpenAI `model`: the served name routes (None)."""
    return None if model == MOA_NAME else model


def solo(engine, prompt, max_tokens: int, *, chat: bool, model: str, routing=None, **sampling):
    """The reference: the prompt run alone in the in-process engine, greedy unless told."""
    from moa_engine import SamplingParams

    params = SamplingParams(max_new_tokens=max_tokens, **{"temperature": 0.0, **sampling})
    [c] = engine.generate([prompt], params, chat=chat, domain=domain_of_model(model), routing=routing)
    return c


# ---------------------------------------------------------------------------------------------
# Live servers
# ---------------------------------------------------------------------------------------------


class Server:
    """A `moa serve` subprocess on loopback. Its stderr is read by a thread (the server logs
    there, and a full pipe would block it); `url` comes from the ready line."""

    def __init__(self, args: list[str], env: dict | None = None, timeout: float = READY_TIMEOUT_S):
        cmd = [sys.executable, "-m", "moa_engine.cli", "serve", "--host", HOST, "--port", "0", *args]
        self.cmd = cmd
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            deadline = time.monotonic() + timeout
            while not self._ready.wait(0.2):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self._reader.join(2)
                    why = f"exited with {self.proc.returncode}" if self.proc.poll() is not None else "timed out"
                    raise RuntimeError(f"moa serve {why} before its ready line.\ncmd: {cmd}\nstderr:\n{self.stderr}")
        except BaseException:
            self.kill()
            raise

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            m = READY.search(line)
            if m and self.url is None:
                self.url = m.group(1).rstrip("/")
                self._ready.set()

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    @property
    def ready_lines(self) -> list[str]:
        return [line for line in self.lines if READY.search(line)]

    def client(self, api_key: str = "x", timeout: float = 60, async_: bool = False):
        import openai

        cls = openai.AsyncOpenAI if async_ else openai.OpenAI
        return cls(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=timeout)

    def terminate(self, timeout: float = 30) -> int | None:
        """SIGTERM, then wait; kill if it does not exit in time. -> the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextmanager
def running_server(args: list[str], env: dict | None = None):
    server = Server(args, env)
    try:
        yield server
    finally:
        server.terminate()


def tiny_server_args(tiny: TinyChat, *extra: str) -> list[str]:
    return ["--experts", str(tiny.moa_dir), "--max-seq-len", str(MAX_SEQ_LEN), *extra]


@pytest.fixture(scope="module")
def main_server(tiny_chat):
    """The tiny MoA server most tests share: --max-batch 8, no key, no runtime experts."""
    with running_server(tiny_server_args(tiny_chat, "--max-batch", "8")) as server:
        yield server


# ---------------------------------------------------------------------------------------------
# /metrics
# ---------------------------------------------------------------------------------------------


def read_metrics(url: str, headers: dict | None = None) -> dict:
    """/metrics as {(sample name, frozenset of label items): value}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{url}/metrics", headers=headers or {}, timeout=30)
    assert r.status_code == 200, r.text
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[s.name, frozenset(s.labels.items())] = s.value
    return samples


def metric(samples: dict, name: str, **labels) -> float:
    """One sample's value (0 when absent: a counter never incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def metric_sum(samples: dict, name: str, **labels) -> float:
    """The sum of a sample over every label set that contains `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def wait_for(predicate, timeout: float, interval: float = 0.1):
    """Poll until predicate() is truthy or the timeout; -> its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# Raw server-sent events
# ---------------------------------------------------------------------------------------------


def sse_events(response) -> list:
    """The `data:` payloads of an httpx streaming response: parsed JSON, or the string "[DONE]"."""
    events = []
    for line in response.iter_lines():
        if not line.startswith("data:"):
            assert not line.strip() or line.startswith((":", "event:", "id:", "retry:")), f"not SSE: {line!r}"
            continue
        payload = line[len("data:") :].strip()
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
