"""benchmarks/serve.py: `moa serve` under load, against the engine's own offline generate.

Setting: the default model (SmolLM2-135M-Instruct) with --experts (default 8) rank-16 random
experts (made by PEFT: moa_engine.testing.make_random_peft_adapter) and random routers, in one
MoA directory. A fixed, seeded list of --requests chat requests; each names one of the experts
or the served name (routed by the routers), generates exactly --max-tokens tokens
(temperature 0, ignore_eos) and is streamed, so that time to first token and the gaps between
tokens are seen by the client as users see them.

Runs, per repeat:
  offline(c)     the baseline: Engine(experts=moa_dir, max_batch=c).generate(all requests), in
                 this process while the server is idle (its loop thread sleeps), so the two
                 never share the CPU: c sequences decoded together, the next prompt taking a slot
                 as soon as one frees, which is the best the server can do at concurrency c;
  closed(c)      c clients over HTTP (httpx, asyncio), each sending its next request when the
                 last one ends, for c in --concurrency (default 1 8 32); max(--min-requests, 3 c)
                 requests (at most --requests), the same ones as offline(c);
  poisson        requests arriving at --rate per second (exponential gaps, seeded; default: 0.7
                 of the closed-loop throughput at the highest concurrency), each on its own
                 connection, however many are in flight.
Reported (medians over --repeats): requests/s and generated tokens/s; TTFT p50 / p99 (from
sending the request to its first text chunk); ITL p50 / p99 (the gaps between a request's
chunks). Ratio: server / offline tokens/s at the same concurrency, paired per repeat. Goal: at
least 0.9 at concurrency 32.

llama.cpp: when `llama-server` is on PATH and llama.cpp's convert_lora_to_gguf.py is found
(--llama-cpp-dir or $LLAMA_CPP_DIR), the same closed-loop workload goes to it on the default
model's GGUF, with the experts converted to GGUF and chosen per request by its `lora` field.
Otherwise the run says why it is skipped.

Output: a table on stdout, JSON (--out, default benchmarks/results/serve.json) and a plot beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__:
    from . import _timing as timing
else:
    import _timing as timing

RANK, ALPHA = 16, 32
SERVED = "moa"
GOAL_RATIO = 0.9
QUESTIONS = (
    "Explain how a hash map handles collisions.",
    "What is the derivative of x squared times sine of x?",
    "Summarise the causes of the French Revolution.",
    "Write a haiku about autumn rain.",
    "How do vaccines train the immune system?",
    "Give three tips for writing clear commit messages.",
    "What is the difference between a contract and an agreement?",
    "Describe the water cycle to a ten-year-old.",
    "Why is the sky blue?",
    "List the planets of the solar system in order.",
    "How does binary search work, step by step?",
    "What should I pack for a week of hiking?",
)


# ---------------------------------------------------------------------------------------------
# Setting: the MoA directory and the requests
# ---------------------------------------------------------------------------------------------


def build_moa_dir(root: Path, n_experts: int, seed: int) -> Path:
    """A MoA directory on the default model: n_experts rank-16 PEFT experts, random routers."""
    from moa_engine.moa_format import MoAConfig, MoADir, RouterConfig
    from moa_engine.models import DEFAULT_MODEL, resolve_model
    from moa_engine.testing import make_random_peft_adapter

    folder = resolve_model(None)
    names = [f"e{i}" for i in range(n_experts)]
    experts = {
        n: make_random_peft_adapter(folder, root / "adapters" / n, r=RANK, alpha=ALPHA, seed=seed + i, init_scale=0.05)
        for i, n in enumerate(names)
    }
    hidden = json.loads((folder / "config.json").read_text())
    g = torch.Generator().manual_seed(seed)
    router = [torch.randn(n_experts, hidden["hidden_size"], generator=g) for _ in range(hidden["num_hidden_layers"])]
    config = MoAConfig(base_model=DEFAULT_MODEL, domains=names, router=RouterConfig(strategy="last"))
    return MoADir.save(root / SERVED, config, experts=experts, router=router, overwrite=True)


def make_requests(n: int, experts: list[str], seed: int) -> list[dict]:
    """n requests: a question (with its index, so prompts differ) and a model, seeded."""
    rng = random.Random(seed)
    models = [*experts, SERVED]
    return [
        {"question": f"{rng.choice(QUESTIONS)} (Request {i}.)", "model": models[rng.randrange(len(models))]}
        for i in range(n)
    ]


# ---------------------------------------------------------------------------------------------
# The offline baseline
# ---------------------------------------------------------------------------------------------


def offline_run(engine, requests, max_tokens: int) -> dict:
    from moa_engine import SamplingParams

    prompts = [[{"role": "user", "content": r["question"]}] for r in requests]
    domains = [None if r["model"] == SERVED else r["model"] for r in requests]
    sampling = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    out = engine.generate(prompts, sampling, chat=True, domain=domains)
    wall = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in out)
    return {"wall_s": wall, "requests_per_s": len(requests) / wall, "tokens_per_s": tokens / wall, "tokens": tokens}


# ---------------------------------------------------------------------------------------------
# The server side: clients over HTTP
# ---------------------------------------------------------------------------------------------


def start_server(args, moa_dir: Path):
    cmd = [sys.executable, "-m", "moa_engine.cli", "serve", "--experts", str(moa_dir), "--port", "0"]
    cmd += ["--max-batch", str(max(args.concurrency)), "--max-seq-len", str(args.max_seq_len)]
    cmd += ["--served-model-name", SERVED, "--max-queue", str(4 * args.requests)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    for line in proc.stderr:
        if "ready on" in line:
            return proc, line.split()[-1]
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"moa serve did not start: {proc.stderr.read() if proc.stderr else ''}")


def chat_body(request, max_tokens: int, model: str | None = None) -> dict:
    return {
        "model": model or request["model"],
        "messages": [{"role": "user", "content": request["question"]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def one_request(client, url: str, body: dict) -> dict:
    """Sends one streaming request; returns its send time, chunk times and generated tokens."""
    sent = time.perf_counter()
    chunks, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:300]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(f"the server failed a request: {event['error']}")
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for c in event.get("choices", []):
                if c.get("delta", {}).get("content") or c.get("text"):
                    chunks.append(time.perf_counter())
    return {"sent": sent, "chunks": chunks, "tokens": tokens}


async def closed_loop(url, requests, concurrency: int, body_of) -> tuple[list[dict], float]:
    import httpx

    queue = list(reversed(requests))
    done = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def client_loop():
            while queue:
                done.append(await one_request(client, url, body_of(queue.pop())))

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        return done, time.perf_counter() - start


async def poisson(url, requests, rate: float, seed: int, body_of) -> tuple[list[dict], float]:
    import httpx

    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(requests) + 4)) as client:
        start = time.perf_counter()
        tasks = []
        for r in requests:
            tasks.append(asyncio.create_task(one_request(client, url, body_of(r))))
            await asyncio.sleep(rng.expovariate(rate))
        done = await asyncio.gather(*tasks)
        return list(done), time.perf_counter() - start


def percentile(values, q: float):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarize(done: list[dict], wall: float) -> dict:
    tokens = sum(d["tokens"] for d in done)
    ttft = [d["chunks"][0] - d["sent"] for d in done if d["chunks"]]
    itl = [b - a for d in done for a, b in zip(d["chunks"], d["chunks"][1:])]
    return {
        "wall_s": wall,
        "requests": len(done),
        "tokens": tokens,
        "requests_per_s": len(done) / wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": 1e3 * percentile(ttft, 50),
        "ttft_p99_ms": 1e3 * percentile(ttft, 99),
        "itl_p50_ms": 1e3 * percentile(itl, 50) if itl else None,
        "itl_p99_ms": 1e3 * percentile(itl, 99) if itl else None,
    }


# ---------------------------------------------------------------------------------------------
# llama.cpp (optional)
# ---------------------------------------------------------------------------------------------


def llama_cpp_setup(args, moa_dir: Path, root: Path):
    """(the llama-server command, model name per expert) or (None, why not)."""
    binary = shutil.which("llama-server")
    if binary is None:
        return None, "llama-server is not on PATH"
    lcpp = args.llama_cpp_dir or os.environ.get("LLAMA_CPP_DIR")
    script = Path(lcpp) / "convert_lora_to_gguf.py" if lcpp else None
    if script is None or not script.exists():
        return None, "llama.cpp's convert_lora_to_gguf.py not found (--llama-cpp-dir or $LLAMA_CPP_DIR)"
    from moa_engine.models import default_gguf_path, resolve_model

    base = resolve_model(None)
    loras = []
    for expert in sorted((moa_dir / "experts").iterdir()):
        out = root / f"{expert.name}.gguf"
        cmd = [sys.executable, str(script), str(expert), "--base", str(base), "--outfile", str(out), "--outtype", "f32"]
        subprocess.run(cmd, check=True, capture_output=True)
        loras.append((expert.name, out))
    cmd = [binary, "-m", str(default_gguf_path()), "-np", str(max(args.concurrency))]
    cmd += ["-c", str(args.max_seq_len * max(args.concurrency)), "--lora-init-without-apply"]
    for _, path in loras:
        cmd += ["--lora", str(path)]
    return (cmd, {name: i for i, (name, _) in enumerate(loras)}), None


def run_llama_cpp(args, setup, requests) -> dict:
    """The closed-loop workload against llama-server, each request's expert in its `lora` field
    (routed requests go to the first expert: llama.cpp has no router)."""
    import socket

    cmd, lora_ids = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)

        def body_of(r):
            body = chat_body(r, args.max_tokens, model="default")
            chosen = lora_ids.get(r["model"], 0)
            body["lora"] = [{"id": i, "scale": 1.0 if i == chosen else 0.0} for i in lora_ids.values()]
            body["n_predict"] = args.max_tokens
            return body

        rows = {}
        for c in args.concurrency:
            done, wall = asyncio.run(closed_loop(url, requests, c, body_of))
            rows[str(c)] = summarize(done, wall)
        return rows
    finally:
        proc.terminate()
        proc.wait(30)


def _wait_healthy(url: str, proc, timeout: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("llama-server did not become healthy")


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def measure(args, moa_dir: Path, requests: list[dict]) -> dict:
    from moa_engine import Engine

    engines = {c: Engine(experts=moa_dir, max_batch=c, max_seq_len=args.max_seq_len) for c in args.concurrency}
    for engine in engines.values():  # warm-up: first-touch of the weights and the KV cache
        offline_run(engine, requests[: min(len(requests), 4)], 4)
    proc, url = start_server(args, moa_dir)
    runs = {"offline": {}, "closed": {}, "poisson": []}
    try:

        def body_of(r):
            return chat_body(r, args.max_tokens)

        asyncio.run(closed_loop(url, requests[:4], 2, lambda r: chat_body(r, 4)))  # the server's warm-up
        for rep in range(args.repeats):
            for c in args.concurrency:  # offline and server alternate, so drift hits both alike
                batch = requests[: min(len(requests), max(args.min_requests, 3 * c))]
                runs["offline"].setdefault(str(c), []).append(offline_run(engines[c], batch, args.max_tokens))
                done, wall = asyncio.run(closed_loop(url, batch, c, body_of))
                runs["closed"].setdefault(str(c), []).append(summarize(done, wall))
                print(f"repeat {rep + 1}: c={c} done", file=sys.stderr, flush=True)
            top = runs["closed"][str(max(args.concurrency))][-1]
            rate = args.rate or 0.7 * top["requests_per_s"]
            done, wall = asyncio.run(poisson(url, requests, rate, args.seed + rep, body_of))
            runs["poisson"].append({"rate_per_s": rate, **summarize(done, wall)})
    finally:
        proc.terminate()
        runs["server_exit_code"] = proc.wait(60)
    return runs


def medians(samples: list[dict]) -> dict:
    keys = [k for k, v in samples[0].items() if isinstance(v, (int, float))]
    return {k: statistics.median(s[k] for s in samples if s[k] is not None) for k in keys}


def table(runs: dict, concurrency: list[int]) -> tuple[list[dict], list[list]]:
    rows, cells = [], []
    for c in concurrency:
        server, offline = runs["closed"][str(c)], runs["offline"][str(c)]
        ratio = statistics.median(s["tokens_per_s"] / o["tokens_per_s"] for s, o in zip(server, offline))
        m, o = medians(server), medians(offline)
        rows.append({"run": f"closed c={c}", "concurrency": c, "server": m, "offline": o, "ratio": ratio})
        cells.append(_cells(f"closed c={c}", m, o["tokens_per_s"], ratio))
    p = medians(runs["poisson"])
    rows.append({"run": "poisson", "server": p})
    cells.append(_cells(f"poisson {p['rate_per_s']:.2f}/s", p, None, None))
    return rows, cells


def _cells(name, m, offline_tps, ratio):
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    return [
        name,
        f(m["requests_per_s"], ".2f"),
        f(m["tokens_per_s"], ".1f"),
        f(offline_tps, ".1f"),
        f(ratio, ".3f"),
        f(m["ttft_p50_ms"], ".0f"),
        f(m["ttft_p99_ms"], ".0f"),
        f(m.get("itl_p50_ms"), ".1f"),
        f(m.get("itl_p99_ms"), ".1f"),
    ]


HEADERS = [
    "run",
    "req/s",
    "tok/s",
    "offline tok/s",
    "server/offline",
    "TTFT p50 ms",
    "TTFT p99",
    "ITL p50 ms",
    "ITL p99",
]


def write_plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed = [r for r in rows if "concurrency" in r]
    cs = [r["concurrency"] for r in closed]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(cs, [r["server"]["tokens_per_s"] for r in closed], "o-", label="moa serve (HTTP, streamed)")
    a.plot(cs, [r["offline"]["tokens_per_s"] for r in closed], "s--", label="offline Engine.generate")
    a.set(xscale="log", xlabel="concurrency", ylabel="generated tokens/s", title="throughput")
    a.set_xticks(cs, [str(c) for c in cs])
    a.legend()
    b.plot(cs, [r["server"]["ttft_p50_ms"] for r in closed], "o-", label="TTFT p50")
    b.plot(cs, [r["server"]["ttft_p99_ms"] for r in closed], "o:", label="TTFT p99")
    b.plot(cs, [r["server"]["itl_p50_ms"] for r in closed], "^-", label="ITL p50")
    b.plot(cs, [r["server"]["itl_p99_ms"] for r in closed], "^:", label="ITL p99")
    b.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="ms", title="latency (client side)")
    b.set_xticks(cs, [str(c) for c in cs])
    b.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--requests", type=int, default=96, help="the most requests per run (Poisson: all of them)")
    p.add_argument(
        "--min-requests",
        type=int,
        default=8,
        help="closed loop at concurrency c: max(this, 3 c) requests, capped by --requests",
    )
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (ignore_eos)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (default: 0.7 x closed-loop)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llama-cpp-dir", default=None, help="llama.cpp checkout (for convert_lora_to_gguf.py)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the offline engine (default: all)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serve.json"))
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 experts, 12 requests, c 1 4, one repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.experts, args.requests, args.min_requests, args.max_tokens = 2, 12, 4, 8
        args.concurrency, args.repeats = [1, 4], 1
    if min(args.concurrency) < 1 or args.requests < max(args.concurrency):
        p.error("--concurrency values must be >= 1 and at most --requests")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = timing.environment("cpu")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moa-serve-bench-") as scratch:
        root = Path(scratch)
        moa_dir = build_moa_dir(root, args.experts, args.seed)
        requests = make_requests(args.requests, [f"e{i}" for i in range(args.experts)], args.seed)
        runs = measure(args, moa_dir, requests)
        rows, cells = table(runs, args.concurrency)
        setup, why = llama_cpp_setup(args, moa_dir, root)
        llama = run_llama_cpp(args, setup, requests) if setup else {"skipped": why}
    print(timing.format_table(HEADERS, cells))
    top = rows[len(args.concurrency) - 1]
    verdict = "met" if top["ratio"] >= GOAL_RATIO else "NOT met"
    print(
        f"\ngoal: server / offline tokens/s >= {GOAL_RATIO} at c={top['concurrency']}: {top['ratio']:.3f} ({verdict})"
    )
    print(f"llama.cpp: {'skipped: ' + llama['skipped'] if 'skipped' in llama else 'measured (see the JSON)'}")
    print(
        f"cpu: {env['cpu']} ({env['cpu_capability']}), threads {env['threads']}; server exit {runs['server_exit_code']}"
    )
    payload = {
        "benchmark": "serve",
        "environment": env,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
        "runs": runs,
        "goal": {"ratio_at_top_concurrency": GOAL_RATIO, "ratio": top["ratio"], "met": top["ratio"] >= GOAL_RATIO},
        "llama_cpp": llama,
        "elapsed_s": time.perf_counter() - started,
    }
    timing.write_json_atomic(args.out, payload)
    plot = args.out.with_suffix(".png")
    write_plot(
        rows,
        plot,
        f"moa serve vs offline generate: {env['cpu']}, {args.experts} experts, {args.max_tokens} tokens/request",
    )
    print(f"wrote {args.out} and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
