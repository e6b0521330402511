"""`moa serve` (the OpenAI-compatible server) against its interface, with the real `openai`
package as the client, against live servers on loopback (subprocesses).

The model is a tiny random Llama with the default model's tokenizer and chat template, three
random experts and a MoA directory with random routers (serve_fixtures.py); the reference for
every answer is the in-process Engine running the same prompt alone (greedy, token for token).
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import openai
import pytest
import torch
from serve_fixtures import (
    EXPERTS,
    MAX_SEQ_LEN,
    MOA_NAME,
    MOA_STRATEGY,
    N_LAYERS,
    Server,
    choose,
    main_server,
    metric,
    metric_sum,
    odd,
    random_messages,
    random_text,
    read_metrics,
    running_server,
    solo,
    sse_events,
    tiny_chat,
    tiny_server_args,
    wait_for,
)

import moa_engine

MODELS = ["base", *EXPERTS, MOA_NAME]  # what `model` may name on the tiny MoA server
STRATEGIES = ["per_layer", "last", "vote"]
API_KEY = "s3cr3t-Key_for-tests"
SHUTDOWN_TIMEOUT_S = 3
EXIT_MARGIN_S = 15


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def extra(obj, key):
    """A field the openai models do not declare (domain, layer_domains, routing): pydantic keeps it."""
    return (obj.model_extra or {}).get(key)


def split_extra(params: dict) -> dict:
    """The openai client's keywords: the server's extra fields go in extra_body."""
    extras = {k: params.pop(k) for k in ("top_k", "routing", "ignore_eos") if k in params}
    return {**params, "extra_body": extras} if extras else params


def ask(client, chat: bool, prompt, model: str, max_tokens: int, **params):
    params = split_extra({"temperature": 0, **params})
    if chat:
        return client.chat.completions.create(model=model, messages=prompt, max_tokens=max_tokens, **params)
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, **params)


def choice_text(choice, chat: bool) -> str:
    return choice.message.content if chat else choice.text


def assert_like_solo(what, choice, text, ref, model, routing=None):
    """A choice (its text given) against the solo reference Completion: text, finish_reason, domain,
    and for routed requests the per-layer domains and the strategy used."""
    assert text == ref.text, f"{what}: text {text!r} != solo run's {ref.text!r}"
    assert choice.finish_reason == ref.finish_reason, f"{what}: finish_reason"
    assert extra(choice, "domain") == ref.domain, f"{what}: domain {extra(choice, 'domain')!r} != {ref.domain!r}"
    if model == MOA_NAME:
        assert extra(choice, "layer_domains") == ref.layer_domains, f"{what}: layer_domains"
        assert extra(choice, "routing") == (routing or MOA_STRATEGY), f"{what}: routing"


def assert_usage(what, usage, prompt_tokens: int, completion_tokens: int):
    assert usage is not None, f"{what}: no usage"
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, completion_tokens), f"{what}: usage"
    assert usage.total_tokens == prompt_tokens + completion_tokens, f"{what}: usage.total_tokens"


def assert_response_shape(r, chat: bool, model: str):
    assert r.object == ("chat.completion" if chat else "text_completion")
    assert r.id and isinstance(r.created, int) and r.created > 0
    assert r.model == model
    assert r.system_fingerprint == f"moa_engine-{moa_engine.__version__}"
    for i, c in enumerate(r.choices):
        assert c.index == i and c.logprobs is None
        if chat:
            assert c.message.role == "assistant"


def error_of(exc: openai.APIStatusError, status: int, cls, etype: str) -> dict:
    """The {"error": {...}} body of an openai error, checked for status, class and type."""
    assert exc.status_code == status, f"status {exc.status_code}, expected {status}: {exc.response.text}"
    assert isinstance(exc, cls), type(exc)
    body = exc.response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    assert err["type"] == etype, err
    assert isinstance(err["message"], str) and err["message"], err
    assert exc.body == err or exc.body == body
    return err


def raw_error(r: httpx.Response, status: int, etype: str) -> dict:
    assert r.status_code == status, f"status {r.status_code}, expected {status}: {r.text}"
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    assert err["type"] == etype, err
    return err


@dataclass
class Streamed:
    """A stream read with the openai client: text, finish_reason and first chunk per choice index."""

    text: dict = field(default_factory=dict)
    finish: dict = field(default_factory=dict)
    first: dict = field(default_factory=dict)
    usage: object = None
    chunks: int = 0


def collect(stream, chat: bool) -> Streamed:
    out = Streamed()
    for chunk in stream:
        out.chunks += 1
        assert chunk.object == ("chat.completion.chunk" if chat else "text_completion"), chunk.object
        if not chunk.choices:
            assert chunk.usage is not None, "a chunk with no choices and no usage"
            assert out.usage is None, "two usage chunks"
            out.usage = chunk.usage
            continue
        assert out.usage is None, "a choice chunk after the usage chunk"
        for c in chunk.choices:
            assert c.index not in out.finish, f"choice {c.index}: a chunk after its finish_reason"
            if c.index not in out.first:
                out.first[c.index] = c
                if chat:
                    assert c.delta.role == "assistant", "the first chat chunk's delta has role assistant"
            piece = c.delta.content if chat else c.text
            out.text[c.index] = out.text.get(c.index, "") + (piece or "")
            if c.finish_reason is not None:
                out.finish[c.index] = c.finish_reason
    return out


def stop_string_of(gen, text: str) -> str:
    """A 2-3 character piece of text (past its first characters), to use as a stop string."""
    start = int(torch.randint(3, max(4, len(text) - 3), (), generator=gen))
    return text[start : start + int(torch.randint(2, 4, (), generator=gen))]


def long_prompt_of(gen) -> str:
    return random_text(gen, 20, 40)


# ---------------------------------------------------------------------------------------------
# The fixture itself: experts and routers that make a difference
# ---------------------------------------------------------------------------------------------


def test_experts_and_routers_change_the_greedy_output(tiny_chat, gen):
    """Guards the rest: on this tiny model each expert, base and routing give different greedy
    tokens, so a server that serves the wrong expert fails the comparisons below."""
    engine = tiny_chat.engine()
    messages = random_messages(gen)
    outs = {m: solo(engine, messages, 9, chat=True, model=m).token_ids for m in ["base", *EXPERTS]}
    assert len({tuple(v) for v in outs.values()}) == len(outs), outs
    routed = engine.route([random_text(gen) for _ in range(12)], routing="last")
    assert len({r.domain for r in routed}) >= 2, "the random routers always choose the same expert"


# ---------------------------------------------------------------------------------------------
# /v1/models, /health
# ---------------------------------------------------------------------------------------------


def test_models_lists_served_name_experts_and_base(main_server):
    assert len(main_server.ready_lines) == 1, main_server.stderr
    assert main_server.url.startswith("http://127.0.0.1:")
    r = httpx.get(f"{main_server.url}/health", timeout=10)
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    models = main_server.client().models.list()
    assert models.object == "list"
    ids = [m.id for m in models.data]
    assert ids == [MOA_NAME, *EXPERTS, "base"]
    parents = [extra(m, "parent") for m in models.data]
    assert parents == [None] + [MOA_NAME] * (len(EXPERTS) + 1)
    for m in models.data:
        assert m.object == "model" and m.owned_by == "moa_engine" and isinstance(m.created, int)
        assert "root" in (m.model_extra or {}), m


def test_served_model_name_option(tiny_chat, gen):
    name = "my-model"
    with running_server(tiny_server_args(tiny_chat, "--served-model-name", name, "--max-batch", "2")) as server:
        client = server.client()
        ids = [m.id for m in client.models.list().data]
        assert ids == [name, *EXPERTS, "base"]
        prompt, n = random_text(gen), odd(gen, 3, 11)
        r = client.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0)
        ref = solo(tiny_chat.engine(), prompt, n, chat=False, model=MOA_NAME)
        assert_like_solo("served name", r.choices[0], r.choices[0].text, ref, MOA_NAME)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=MOA_NAME, prompt=prompt, max_tokens=3)


# ---------------------------------------------------------------------------------------------
# Chat and completions against the solo runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_chat_matches_solo_engine(model, main_server, tiny_chat, gen):
    client, engine = main_server.client(), tiny_chat.engine()
    for attempt in range(2):
        messages, n = random_messages(gen), odd(gen, 3, 31)
        r = ask(client, True, messages, model, n, user=f"user-{attempt}")
        ref = solo(engine, messages, n, chat=True, model=model)
        assert_response_shape(r, True, model)
        assert len(r.choices) == 1
        assert_like_solo(f"{model} #{attempt}", r.choices[0], r.choices[0].message.content, ref, model)
        assert_usage(model, r.usage, len(ref.prompt_token_ids), len(ref.token_ids))


@pytest.mark.parametrize("model", MODELS)
def test_completions_matches_solo_engine(model, main_server, tiny_chat, gen):
    client, engine = main_server.client(), tiny_chat.engine()
    for attempt in range(2):
        prompt, n = random_text(gen, 1, 30), odd(gen, 1, 29)
        r = ask(client, False, prompt, model, n)
        ref = solo(engine, prompt, n, chat=False, model=model)
        assert_response_shape(r, False, model)
        assert len(r.choices) == 1
        assert_like_solo(f"{model} #{attempt}", r.choices[0], r.choices[0].text, ref, model)
        assert_usage(model, r.usage, len(ref.prompt_token_ids), len(ref.token_ids))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_routed_request_uses_the_requested_strategy(strategy, main_server, tiny_chat, gen):
    client, engine = main_server.client(), tiny_chat.engine()
    for chat in (True, False):
        prompt = random_messages(gen) if chat else random_text(gen)
        n = odd(gen, 3, 17)
        r = ask(client, chat, prompt, MOA_NAME, n, routing=strategy)
        ref = solo(engine, prompt, n, chat=chat, model=MOA_NAME, routing=strategy)
        assert_like_solo(
            f"{strategy} chat={chat}", r.choices[0], choice_text(r.choices[0], chat), ref, MOA_NAME, strategy
        )
        assert len(extra(r.choices[0], "layer_domains")) == N_LAYERS


def test_completions_default_max_tokens_is_16(main_server, tiny_chat, gen):
    prompt, model = random_text(gen), choose(gen, EXPERTS)
    r = main_server.client().completions.create(
        model=model, prompt=prompt, temperature=0, extra_body={"ignore_eos": True}
    )
    ref = solo(tiny_chat.engine(), prompt, 16, chat=False, model=model, ignore_eos=True)
    assert_like_solo("default max_tokens", r.choices[0], r.choices[0].text, ref, model)
    assert r.usage.completion_tokens == 16


def test_completions_prompt_list(main_server, tiny_chat, gen):
    """A list of prompts: one choice per prompt, in order; usage sums over them."""
    client, engine = main_server.client(), tiny_chat.engine()
    prompts = [random_text(gen, 1, 3), long_prompt_of(gen), random_text(gen, 5, 9)]
    for model in (choose(gen, EXPERTS), MOA_NAME):
        n = odd(gen, 5, 21)
        r = ask(client, False, prompts, model, n)
        refs = [solo(engine, p, n, chat=False, model=model) for p in prompts]
        assert [c.index for c in r.choices] == list(range(len(prompts)))
        for i, (c, ref) in enumerate(zip(r.choices, refs)):
            assert_like_solo(f"{model} prompt {i}", c, c.text, ref, model)
        assert_usage(
            "prompt list", r.usage, sum(len(x.prompt_token_ids) for x in refs), sum(len(x.token_ids) for x in refs)
        )


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_n_with_seed_uses_seed_plus_index(chat, main_server, tiny_chat, gen):
    """n=2 with a seed: choice i samples with seed + i (so the answer repeats exactly)."""
    client, engine = main_server.client(), tiny_chat.engine()
    model = choose(gen, ["base", *EXPERTS])
    prompt = random_messages(gen) if chat else random_text(gen)
    n_tokens, seed = odd(gen, 9, 25), int(torch.randint(0, 2**31, (), generator=gen))
    sampling = dict(temperature=0.9, top_p=0.95, seed=seed)
    r = ask(client, chat, prompt, model, n_tokens, n=2, top_k=40, **sampling)
    refs = [
        solo(engine, prompt, n_tokens, chat=chat, model=model, temperature=0.9, top_p=0.95, top_k=40, seed=seed + i)
        for i in range(2)
    ]
    assert [c.index for c in r.choices] == [0, 1]
    for c, ref in zip(r.choices, refs):
        assert_like_solo(f"n=2 choice {c.index}", c, choice_text(c, chat), ref, model)
    assert refs[0].token_ids != refs[1].token_ids, "seeds seed and seed+1 gave the same sample"
    # OpenAI's usage: the prompt once, the completion tokens of every choice.
    assert_usage("n=2", r.usage, len(refs[0].prompt_token_ids), sum(len(x.token_ids) for x in refs))
    again = ask(client, chat, prompt, model, n_tokens, n=2, top_k=40, **sampling)
    assert [choice_text(c, chat) for c in again.choices] == [choice_text(c, chat) for c in r.choices]


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_stop_strings(chat, main_server, tiny_chat, gen):
    client, engine = main_server.client(), tiny_chat.engine()
    for attempt, model in enumerate((choose(gen, EXPERTS), MOA_NAME, "base")):
        prompt, n = (random_messages(gen) if chat else random_text(gen)), odd(gen, 21, 41)
        free = solo(engine, prompt, n, chat=chat, model=model, ignore_eos=True)
        stop = stop_string_of(gen, free.text)
        stops = stop if attempt % 2 == 0 else ["never-in-this-text-§§", stop]
        r = ask(client, chat, prompt, model, n, stop=stops, ignore_eos=True)
        ref = solo(engine, prompt, n, chat=chat, model=model, stop=stops, ignore_eos=True)
        assert ref.finish_reason == "stop" and stop not in ref.text, (stop, ref)
        c = r.choices[0]
        assert_like_solo(f"stop {stops!r}", c, choice_text(c, chat), ref, model)
        assert_usage("stop", r.usage, len(ref.prompt_token_ids), len(ref.token_ids))


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_streaming_equals_non_streaming(chat, main_server, tiny_chat, gen):
    client, engine = main_server.client(), tiny_chat.engine()
    for attempt, model in enumerate((MOA_NAME, choose(gen, EXPERTS), "base")):
        prompt, n = (random_messages(gen) if chat else random_text(gen)), odd(gen, 7, 37)
        include_usage = attempt != 2
        whole = ask(client, chat, prompt, model, n)
        stream = ask(client, chat, prompt, model, n, stream=True, stream_options={"include_usage": include_usage})
        got = collect(stream, chat)
        ref = solo(engine, prompt, n, chat=chat, model=model)
        what = f"{model} stream"
        assert got.text == {0: choice_text(whole.choices[0], chat)}, what
        assert got.text[0] == ref.text, what
        assert got.finish == {0: whole.choices[0].finish_reason} == {0: ref.finish_reason}, what
        first = got.first[0]
        assert extra(first, "domain") == ref.domain, what
        if model == MOA_NAME:
            assert extra(first, "layer_domains") == ref.layer_domains, what
        if include_usage:
            assert_usage(what, got.usage, len(ref.prompt_token_ids), len(ref.token_ids))
            assert got.usage.model_dump() == whole.usage.model_dump()
        else:
            assert got.usage is None, "a usage chunk without stream_options.include_usage"


def test_streaming_n2_with_seed(main_server, tiny_chat, gen):
    client, engine = main_server.client(), tiny_chat.engine()
    prompt, n, seed = random_text(gen), odd(gen, 11, 23), int(torch.randint(0, 2**31, (), generator=gen))
    model = choose(gen, EXPERTS)
    stream = ask(
        client,
        False,
        prompt,
        model,
        n,
        n=2,
        seed=seed,
        temperature=1.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    got = collect(stream, False)
    refs = [solo(engine, prompt, n, chat=False, model=model, temperature=1.0, seed=seed + i) for i in range(2)]
    assert got.text == {0: refs[0].text, 1: refs[1].text}
    assert got.finish == {0: refs[0].finish_reason, 1: refs[1].finish_reason}
    assert {i: extra(c, "domain") for i, c in got.first.items()} == {0: model, 1: model}
    assert_usage("n=2 stream", got.usage, len(refs[0].prompt_token_ids), sum(len(x.token_ids) for x in refs))


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_streaming_wire_format(chat, main_server, tiny_chat, gen):
    """The raw event stream: text/event-stream, `data: {json}` events, `data: [DONE]` last."""
    prompt, n = (random_messages(gen) if chat else random_text(gen)), odd(gen, 5, 15)
    body = {"model": MOA_NAME, "max_tokens": n, "temperature": 0, "stream": True}
    body.update({"messages": prompt} if chat else {"prompt": prompt})
    path = "/v1/chat/completions" if chat else "/v1/completions"
    with httpx.stream("POST", f"{main_server.url}{path}", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1, "one id for every chunk of a response"
    ref = solo(tiny_chat.engine(), prompt, n, chat=chat, model=MOA_NAME)
    key = "delta" if chat else None
    pieces = [(c["choices"][0][key].get("content") if key else c["choices"][0].get("text")) or "" for c in chunks]
    assert "".join(pieces) == ref.text
    assert chunks[0]["choices"][0]["domain"] == ref.domain
    assert chunks[0]["choices"][0]["layer_domains"] == ref.layer_domains
    assert chunks[-1]["choices"][0]["finish_reason"] == ref.finish_reason
    assert all(c["choices"][0].get("finish_reason") is None for c in chunks[:-1])


# ---------------------------------------------------------------------------------------------
# Many clients at once
# ---------------------------------------------------------------------------------------------


def test_concurrent_clients_match_solo_runs(main_server, tiny_chat, gen):
    """40 clients at once (more than --max-batch 8) mixing experts, base, routed and streaming:
    every answer equals its solo run, none is lost, and the server is healthy and idle after."""
    engine = tiny_chat.engine()
    jobs = []
    for i in range(40):
        chat = bool(torch.randint(2, (), generator=gen))
        model = choose(gen, MODELS)
        routing = choose(gen, [None, *STRATEGIES]) if model == MOA_NAME else None
        prompt = random_messages(gen) if chat else random_text(gen, 1, 25)
        n = odd(gen, 3, 41)
        stream = bool(torch.randint(2, (), generator=gen))
        params = {"routing": routing} if routing else {}
        ref = solo(engine, prompt, n, chat=chat, model=model, routing=routing)
        jobs.append(dict(i=i, chat=chat, model=model, prompt=prompt, n=n, stream=stream, params=params, ref=ref))
    client = main_server.client(timeout=120)

    def run(job):
        if job["stream"]:
            s = ask(
                client,
                job["chat"],
                job["prompt"],
                job["model"],
                job["n"],
                stream=True,
                stream_options={"include_usage": True},
                **job["params"],
            )
            got = collect(s, job["chat"])
            return got.text.get(0), got.finish.get(0), got.first.get(0), got.usage
        r = ask(client, job["chat"], job["prompt"], job["model"], job["n"], **job["params"])
        c = r.choices[0]
        return choice_text(c, job["chat"]), c.finish_reason, c, r.usage

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    assert len(results) == len(jobs)
    for job, (text, finish, first, usage) in zip(jobs, results):
        ref, what = job["ref"], f"job {job['i']} ({job['model']}, chat={job['chat']}, stream={job['stream']})"
        assert text == ref.text, f"{what}: {text!r} != {ref.text!r}"
        assert finish == ref.finish_reason, what
        assert extra(first, "domain") == ref.domain, what
        assert_usage(what, usage, len(ref.prompt_token_ids), len(ref.token_ids))
    assert httpx.get(f"{main_server.url}/health", timeout=10).status_code == 200
    idle = wait_for(lambda: metric(read_metrics(main_server.url), "moa_requests_running") == 0, 20)
    assert idle, "moa_requests_running did not return to 0"
    assert metric(read_metrics(main_server.url), "moa_requests_waiting") == 0


# ---------------------------------------------------------------------------------------------
# Clients that hang up
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hangup_server(tiny_chat):
    """A server of its own for the hang-ups: a request that is not cancelled keeps running for many seconds,
    and must not hold a slot of main_server. A short --shutdown-timeout bounds the teardown then."""
    with running_server(tiny_server_args(tiny_chat, "--max-batch", "2", "--shutdown-timeout", "2")) as server:
        yield server


def wait_idle_and_count(url, cancelled_before, timeout=20.0):
    def done():
        m = read_metrics(url)
        ok = metric(m, "moa_requests_total", status="cancelled") >= cancelled_before + 1
        return m if ok and metric(m, "moa_requests_running") == 0 else None

    return wait_for(done, timeout, 0.2)


def test_client_hanging_up_mid_stream_frees_its_slot(hangup_server, tiny_chat, gen):
    url = hangup_server.url
    assert wait_for(lambda: metric(read_metrics(url), "moa_requests_running") == 0, 20)
    before = read_metrics(url)
    cancelled = metric(before, "moa_requests_total", status="cancelled")
    body = {
        "model": choose(gen, EXPERTS),
        "prompt": random_text(gen),
        "max_tokens": MAX_SEQ_LEN - 200,  # seconds of work if it were not cancelled
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data:"):
                    break
        # leaving the block closes the connection mid-stream
    after = wait_idle_and_count(url, cancelled)
    assert after is not None, (
        f"after the hang-up: cancelled {metric(read_metrics(url), 'moa_requests_total', status='cancelled')} "
        f"(before {cancelled}), running {metric(read_metrics(url), 'moa_requests_running')}"
    )
    assert metric(after, "moa_requests_total", status="cancelled") == cancelled + 1
    assert metric(after, "moa_requests_total", status="length") == metric(before, "moa_requests_total", status="length")
    # The next requests are served as usual.
    prompt, n, model = random_text(gen), odd(gen, 5, 15), choose(gen, MODELS)
    r = ask(hangup_server.client(), False, prompt, model, n)
    assert_like_solo(
        "after the hang-up",
        r.choices[0],
        r.choices[0].text,
        solo(tiny_chat.engine(), prompt, n, chat=False, model=model),
        model,
    )


def test_client_hanging_up_non_streaming_is_cancelled(hangup_server, gen):
    url = hangup_server.url
    assert wait_for(lambda: metric(read_metrics(url), "moa_requests_running") == 0, 20)
    cancelled = metric(read_metrics(url), "moa_requests_total", status="cancelled")
    body = {
        "model": "base",
        "messages": random_messages(gen),
        "max_tokens": MAX_SEQ_LEN - 400,
        "ignore_eos": True,
        "temperature": 0,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=1.0))
    after = wait_idle_and_count(url, cancelled)
    assert after is not None, "the abandoned request was not cancelled (or its slot not freed) within 20 s"
    assert metric(after, "moa_requests_total", status="cancelled") == cancelled + 1


# ---------------------------------------------------------------------------------------------
# Runtime experts
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime_server(tiny_chat):
    with running_server(tiny_server_args(tiny_chat, "--max-batch", "4", "--allow-runtime-experts")) as server:
        yield server


def post(url, path, body, **headers):
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=60)


def test_runtime_expert_load_use_unload_while_streaming(runtime_server, tiny_chat, gen):
    url, client = runtime_server.url, runtime_server.client()
    r = post(url, "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": str(tiny_chat.spare["extra"])})
    assert r.status_code == 200, r.text
    models = client.models.list().data
    assert [m.id for m in models][: len(EXPERTS) + 1] == [MOA_NAME, *EXPERTS]
    assert "extra" in [m.id for m in models] and "base" in [m.id for m in models]
    assert {m.id: extra(m, "parent") for m in models}["extra"] == MOA_NAME

    ref_engine = tiny_chat.engine("extra")
    for chat in (True, False):
        prompt, n = (random_messages(gen) if chat else random_text(gen)), odd(gen, 5, 27)
        r = ask(client, chat, prompt, "extra", n)
        ref = solo(ref_engine, prompt, n, chat=chat, model="extra")
        assert_like_solo(f"runtime expert chat={chat}", r.choices[0], choice_text(r.choices[0], chat), ref, "extra")

    # Unload while a request on it is streaming: that request keeps its expert to the end.
    prompt, n = random_text(gen), 1001
    ref = solo(ref_engine, prompt, n, chat=False, model="extra", ignore_eos=True)
    stream = ask(client, False, prompt, "extra", n, stream=True, ignore_eos=True)
    it = iter(stream)
    first = next(it)
    assert extra(first.choices[0], "domain") == "extra"
    r = post(url, "/v1/unload_lora_adapter", {"lora_name": "extra"})
    assert r.status_code == 200, r.text
    rest = collect(it, False)
    assert rest.chunks > 0, "the stream had ended before the unload: the test did not test it"
    text = (first.choices[0].text or "") + rest.text.get(0, "")
    assert text == ref.text, "the streaming request lost its expert when it was unloaded"
    assert rest.finish == {0: "length"}

    with pytest.raises(openai.NotFoundError) as exc:
        ask(client, False, prompt, "extra", 3)
    err = error_of(exc.value, 404, openai.NotFoundError, "not_found_error")
    assert err["code"] == "model_not_found" and "extra" in err["message"]
    assert "extra" not in [m.id for m in client.models.list().data]
    # The served experts are unaffected.
    model = choose(gen, EXPERTS)
    r = ask(client, False, prompt, model, 7)
    assert_like_solo(
        "after unload",
        r.choices[0],
        r.choices[0].text,
        solo(tiny_chat.engine(), prompt, 7, chat=False, model=model),
        model,
    )


def test_runtime_expert_errors(runtime_server, tiny_chat, tmp_path):
    url = runtime_server.url
    r = post(url, "/v1/load_lora_adapter", {"lora_name": "code", "lora_path": str(tiny_chat.spare["extra2"])})
    err = raw_error(r, 400, "invalid_request_error")
    assert "code" in err["message"], err
    bad = tmp_path / "no-such-adapter"
    r = post(url, "/v1/load_lora_adapter", {"lora_name": "extra2", "lora_path": str(bad)})
    err = raw_error(r, 400, "invalid_request_error")
    assert str(bad) in err["message"] or "no-such-adapter" in err["message"], err
    r = post(url, "/v1/unload_lora_adapter", {"lora_name": "never-loaded"})
    err = raw_error(r, 404, "not_found_error")
    assert "never-loaded" in err["message"], err
    # Nothing was half-loaded by the failures.
    assert [m.id for m in runtime_server.client().models.list().data] == [MOA_NAME, *EXPERTS, "base"]


def test_non_finite_logits_are_a_500_and_the_others_go_on(runtime_server, tiny_chat, tmp_path, gen):
    """An expert whose finite weights overflow (lora_B = 1e30) loads; its requests get OpenAI's
    500 error (a stream: an error event, then [DONE]) instead of tokens, while a request on
    another expert in the same batch gets its solo answer, and the server stays healthy."""
    import shutil

    import safetensors.torch

    huge = shutil.copytree(tiny_chat.spare["extra2"], tmp_path / "huge")
    path = huge / "adapter_model.safetensors"
    weights = safetensors.torch.load_file(path)
    safetensors.torch.save_file({k: v.fill_(1e30) if "lora_B" in k else v for k, v in weights.items()}, path)
    url, client = runtime_server.url, runtime_server.client()
    r = post(url, "/v1/load_lora_adapter", {"lora_name": "huge", "lora_path": str(huge)})
    assert r.status_code == 200, r.text
    errors_before = metric(read_metrics(url), "moa_requests_total", status="error")
    try:
        model, prompt, n = choose(gen, EXPERTS), random_text(gen), odd(gen, 9, 31)
        ref = solo(tiny_chat.engine(), prompt, n, chat=False, model=model, ignore_eos=True)
        with ThreadPoolExecutor(2) as pool:
            good = pool.submit(ask, client, False, prompt, model, n, ignore_eos=True)
            bad = pool.submit(ask, client, True, random_messages(gen), "huge", 11)
            with pytest.raises(openai.InternalServerError) as exc:
                bad.result()
            assert_like_solo(
                "beside the failing request", good.result().choices[0], good.result().choices[0].text, ref, model
            )
        err = error_of(exc.value, 500, openai.InternalServerError, "server_error")
        assert err["code"] == "engine_error" and "non-finite logits" in err["message"] and "huge" in err["message"], err
        body = {"model": "huge", "prompt": random_text(gen), "max_tokens": 5, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
            events = sse_events(resp)
        assert events[-1] == "[DONE]", events
        assert "non-finite logits" in events[-2]["error"]["message"], events
        assert metric(read_metrics(url), "moa_requests_total", status="error") == errors_before + 2
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        post(url, "/v1/unload_lora_adapter", {"lora_name": "huge"})


def test_runtime_expert_routes_are_404_without_the_flag(main_server, tiny_chat):
    url = main_server.url
    r = post(url, "/v1/load_lora_adapter", {"lora_name": "extra2", "lora_path": str(tiny_chat.spare["extra2"])})
    assert r.status_code == 404, r.text
    r = post(url, "/v1/unload_lora_adapter", {"lora_name": "code"})
    assert r.status_code == 404, r.text
    assert [m.id for m in main_server.client().models.list().data] == [MOA_NAME, *EXPERTS, "base"]


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

MISSING = object()
# (id, chat, changes to a good request, the param named, pieces of the message: the field and what is
# expected, then what was given; CONTRIBUTING's error-message rule asks for all three)
BAD_REQUESTS = [
    ("missing_messages", True, {"messages": MISSING}, "messages", ["messages"], []),
    ("empty_messages", True, {"messages": []}, "messages", ["messages"], []),
    ("missing_prompt", False, {"prompt": MISSING}, "prompt", ["prompt"], []),
    ("empty_prompt", False, {"prompt": ""}, "prompt", ["prompt"], []),
    ("empty_prompt_list", False, {"prompt": []}, "prompt", ["prompt"], []),
    ("temperature_negative", True, {"temperature": -1}, "temperature", ["temperature", "0"], ["-1"]),
    ("top_p_zero", False, {"top_p": 0}, "top_p", ["top_p"], ["0"]),
    ("top_p_above_one", True, {"top_p": 1.5}, "top_p", ["top_p", "1"], ["1.5"]),
    ("max_tokens_zero", False, {"max_tokens": 0}, "max_tokens", ["max_tokens", "1"], ["0"]),
    ("n_zero", True, {"n": 0}, "n", ["1"], ["0"]),
    ("n_17", False, {"n": 17}, "n", ["16"], ["17"]),
    ("top_k_negative", False, {"top_k": -1}, "top_k", ["top_k", "0"], ["-1"]),
    ("unknown_routing", True, {"routing": "zigzag"}, "routing", ["routing", *STRATEGIES], ["zigzag"]),
    ("seed_negative", False, {"seed": -1}, "seed", ["seed"], ["-1"]),
    ("seed_2_64", True, {"seed": 2**64}, "seed", ["seed"], [str(2**64)]),
]


def good_request(chat: bool, gen) -> dict:
    body = {"model": choose(gen, MODELS), "max_tokens": 5, "temperature": 0}
    return {**body, "messages": random_messages(gen)} if chat else {**body, "prompt": random_text(gen)}


def bad_request_error(case, server, gen) -> dict:
    """Send a good request with the case's changes; -> its 400 error, checked for type and param."""
    _, chat, changes, param, _, _ = case
    body = {**good_request(chat, gen), **changes}
    body = {k: v for k, v in body.items() if v is not MISSING}
    if any(v is MISSING for v in changes.values()):  # the openai client cannot leave these out
        path = "/v1/chat/completions" if chat else "/v1/completions"
        err = raw_error(post(server.url, path, body), 400, "invalid_request_error")
    else:
        client = server.client()
        call = client.chat.completions.create if chat else client.completions.create
        with pytest.raises(openai.BadRequestError) as exc:
            call(**split_extra(body))
        err = error_of(exc.value, 400, openai.BadRequestError, "invalid_request_error")
    assert err["param"] == param, err
    return err


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_400_naming_the_param(case, main_server, gen):
    err = bad_request_error(case, main_server, gen)
    for piece in case[4]:
        assert piece in err["message"], f"{piece!r} not in the message: {err['message']!r}"


GIVEN_VALUE_CASES = [c for c in BAD_REQUESTS if c[5]]


@pytest.mark.parametrize("case", GIVEN_VALUE_CASES, ids=[c[0] for c in GIVEN_VALUE_CASES])
def test_bad_request_message_quotes_the_given_value(case, main_server, gen):
    err = bad_request_error(case, main_server, gen)
    for piece in case[5]:
        assert piece in err["message"], f"the given value {piece!r} is not in the message: {err['message']!r}"


@pytest.mark.parametrize("body", ["{not json", '{"model": "base", "prompt": "x",', "[1, 2", ""], ids=range(4))
def test_malformed_json_is_400(body, main_server):
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = httpx.post(
            f"{main_server.url}{path}", content=body, headers={"Content-Type": "application/json"}, timeout=30
        )
        err = raw_error(r, 400, "invalid_request_error")
        assert "json" in err["message"].lower(), err


def test_prompt_plus_max_tokens_beyond_max_seq_len_is_400(main_server, tiny_chat, gen):
    client, engine = main_server.client(), tiny_chat.engine()
    prompt = random_text(gen)
    n_prompt = len(engine.encode(prompt))
    with pytest.raises(openai.BadRequestError) as exc:
        ask(client, False, prompt, choose(gen, MODELS), MAX_SEQ_LEN - n_prompt + 1)  # one over
    err = error_of(exc.value, 400, openai.BadRequestError, "invalid_request_error")
    assert err["param"] in ("max_tokens", "prompt"), err
    assert str(MAX_SEQ_LEN) in err["message"], err
    messages = random_messages(gen)
    n_chat = len(engine.encode(messages, chat=True))
    with pytest.raises(openai.BadRequestError) as exc:
        ask(client, True, messages, choose(gen, MODELS), MAX_SEQ_LEN - n_chat + 1)
    err = error_of(exc.value, 400, openai.BadRequestError, "invalid_request_error")
    assert err["param"] in ("max_tokens", "messages"), err
    assert str(MAX_SEQ_LEN) in err["message"], err
    # A chat prompt longer than max_seq_len on its own, with the default max_tokens.
    long_messages = [{"role": "user", "content": " ".join(["word"] * (MAX_SEQ_LEN + 7))}]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="base", messages=long_messages)
    err = error_of(exc.value, 400, openai.BadRequestError, "invalid_request_error")
    assert err["param"] in ("messages", "max_tokens"), err
    assert str(MAX_SEQ_LEN) in err["message"], err


def test_unknown_model_is_404_listing_the_models(main_server, gen):
    for chat in (True, False):
        with pytest.raises(openai.NotFoundError) as exc:
            ask(main_server.client(), chat, random_messages(gen) if chat else random_text(gen), "no-such-model", 3)
        err = error_of(exc.value, 404, openai.NotFoundError, "not_found_error")
        assert err["code"] == "model_not_found", err
        assert "no-such-model" in err["message"], err
        for name in MODELS:
            assert name in err["message"], f"{name!r} not listed in {err['message']!r}"


# ---------------------------------------------------------------------------------------------
# API key
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def key_server(tiny_chat):
    """A server whose key comes from MOA_API_KEY."""
    with running_server(tiny_server_args(tiny_chat, "--max-batch", "2"), env={"MOA_API_KEY": API_KEY}) as server:
        yield server


def test_api_key_from_env_is_required_except_for_health(key_server, tiny_chat, gen):
    url = key_server.url
    prompt, n, model = random_text(gen), odd(gen, 3, 9), choose(gen, MODELS)
    for key in ("wrong", API_KEY + "x", API_KEY[:-1]):
        with pytest.raises(openai.AuthenticationError) as exc:
            ask(key_server.client(api_key=key), False, prompt, model, n)
        error_of(exc.value, 401, openai.AuthenticationError, "authentication_error")
        with pytest.raises(openai.AuthenticationError):
            key_server.client(api_key=key).models.list()
    body = {"model": model, "prompt": prompt, "max_tokens": n}
    raw_error(post(url, "/v1/completions", body), 401, "authentication_error")  # no Authorization header
    raw_error(post(url, "/v1/completions", body, Authorization=API_KEY), 401, "authentication_error")  # no Bearer
    assert httpx.get(f"{url}/metrics", timeout=10).status_code == 401
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
    r = httpx.get(f"{url}/health", timeout=10)
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    # The right key.
    good = key_server.client(api_key=API_KEY)
    assert [m.id for m in good.models.list().data] == [MOA_NAME, *EXPERTS, "base"]
    r = ask(good, False, prompt, model, n)
    assert_like_solo(
        "with the key",
        r.choices[0],
        r.choices[0].text,
        solo(tiny_chat.engine(), prompt, n, chat=False, model=model),
        model,
    )
    read_metrics(url, headers={"Authorization": f"Bearer {API_KEY}"})


# ---------------------------------------------------------------------------------------------
# Queue full
# ---------------------------------------------------------------------------------------------


def test_queue_full_is_429_and_the_rest_complete(tiny_chat, gen):
    args = tiny_server_args(tiny_chat, "--max-batch", "1", "--max-queue", "1", "--api-key", API_KEY)
    with running_server(args) as server:
        client = server.client(api_key=API_KEY, timeout=120)
        prompts = [random_text(gen) for _ in range(6)]
        n = 401

        def run(prompt):
            try:
                r = ask(client, False, prompt, "base", n, ignore_eos=True)
                return r.choices[0].text, r.usage.completion_tokens
            except openai.RateLimitError as exc:
                return exc

        headers = {"Authorization": f"Bearer {API_KEY}"}
        with ThreadPoolExecutor(len(prompts)) as pool:
            first = pool.submit(run, prompts[0])  # running once it is admitted; then one may wait
            running = wait_for(lambda: metric(read_metrics(server.url, headers), "moa_requests_running") == 1, 30, 0.02)
            assert running, "the first request never showed as running"
            rest = [pool.submit(run, p) for p in prompts[1:]]
            results = [first.result()] + [f.result() for f in rest]
        rejected = [r for r in results if isinstance(r, Exception)]
        served = [(p, r) for p, r in zip(prompts, results) if not isinstance(r, Exception)]
        assert rejected, "6 long requests at once with --max-batch 1 --max-queue 1: none got 429"
        assert len(served) >= 2, "the running request and the waiting one must complete"
        for exc in rejected:
            err = error_of(exc, 429, openai.RateLimitError, "rate_limit_error")
            assert err["code"] == "queue_full", err
        engine = tiny_chat.engine()
        for prompt, (text, tokens) in served:
            assert tokens == n
            assert text == solo(engine, prompt, n, chat=False, model="base", ignore_eos=True).text
        m = read_metrics(server.url, headers)
        assert metric(m, "moa_requests_total", status="rejected") == len(rejected)
        assert metric(m, "moa_requests_total", status="length") == len(served)
        # Once the queue drains, requests are accepted again.
        r = ask(client, False, prompts[0], "base", 5)
        assert r.usage.completion_tokens == len(solo(engine, prompts[0], 5, chat=False, model="base").token_ids)


# ---------------------------------------------------------------------------------------------
# /metrics
# ---------------------------------------------------------------------------------------------

METRIC_SAMPLES = [
    "moa_requests_total",
    "moa_prompt_tokens_total",
    "moa_generation_tokens_total",
    "moa_requests_running",
    "moa_requests_waiting",
    "moa_time_to_first_token_seconds_count",
    "moa_inter_token_latency_seconds_count",
    "moa_request_latency_seconds_count",
    "moa_time_to_first_token_seconds_bucket",
    "moa_request_latency_seconds_sum",
    "moa_expert_requests_total",
    "moa_expert_generation_tokens_total",
    "moa_routing_decisions_total",
    "moa_routing_layer_decisions_total",
]


def test_metrics_count_the_traffic(main_server, tiny_chat, gen):
    url, client, engine = main_server.url, main_server.client(), tiny_chat.engine()
    assert wait_for(lambda: metric(read_metrics(url), "moa_requests_running") == 0, 20)
    before = read_metrics(url)
    requests = [(c, m, r) for c, m, r in [(True, e, None) for e in EXPERTS] + [(False, "base", None)]]
    requests += [(chat, MOA_NAME, s) for chat, s in zip((False, True, False, True), (None, *STRATEGIES))]
    refs = []
    for chat, model, routing in requests:
        prompt, n = (random_messages(gen) if chat else random_text(gen)), odd(gen, 3, 19)
        stream = bool(torch.randint(2, (), generator=gen))
        params = {"routing": routing} if routing else {}
        if stream:
            got = collect(
                ask(client, chat, prompt, model, n, stream=True, stream_options={"include_usage": True}, **params), chat
            )
            usage = got.usage
        else:
            usage = ask(client, chat, prompt, model, n, **params).usage
        ref = solo(engine, prompt, n, chat=chat, model=model, routing=routing)
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(ref.prompt_token_ids), len(ref.token_ids))
        refs.append((model, routing, ref, usage))
    # One with a stop string, for the "stop" status.
    prompt = random_text(gen)
    free = solo(engine, prompt, 31, chat=False, model="base", ignore_eos=True)
    stop = stop_string_of(gen, free.text)
    usage = ask(client, False, prompt, "base", 31, stop=stop, ignore_eos=True).usage
    refs.append(("base", None, solo(engine, prompt, 31, chat=False, model="base", stop=stop, ignore_eos=True), usage))

    assert wait_for(lambda: metric(read_metrics(url), "moa_requests_running") == 0, 20)
    after = read_metrics(url)
    names = {name for name, _ in after}
    missing = [n for n in METRIC_SAMPLES if n not in names]
    assert not missing, f"/metrics lacks {missing}"

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    def delta_sum(name, **labels):
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    count = len(refs)
    for status in ("stop", "length"):
        want = sum(ref.finish_reason == status for _, _, ref, _ in refs)
        assert delta("moa_requests_total", status=status) == want, status
    for status in ("cancelled", "error", "rejected"):
        assert delta("moa_requests_total", status=status) == 0, status
    assert delta("moa_prompt_tokens_total") == sum(u.prompt_tokens for *_, u in refs)
    assert delta("moa_generation_tokens_total") == sum(u.completion_tokens for *_, u in refs)
    assert metric(after, "moa_requests_running") == 0 and metric(after, "moa_requests_waiting") == 0
    for hist in ("moa_time_to_first_token_seconds", "moa_request_latency_seconds"):
        assert delta_sum(f"{hist}_count") == count, hist
        assert delta_sum(f"{hist}_sum") > 0, hist
    assert delta_sum("moa_inter_token_latency_seconds_count") > 0
    domains = sorted({ref.domain for _, _, ref, _ in refs})
    assert "mixed" in domains or any(r.domain in EXPERTS for m, _, r, _ in refs if m == MOA_NAME)
    for d in domains:
        want_requests = sum(ref.domain == d for _, _, ref, _ in refs)
        want_tokens = sum(len(ref.token_ids) for _, _, ref, _ in refs if ref.domain == d)
        assert delta("moa_expert_requests_total", expert=d) == want_requests, d
        assert delta("moa_expert_generation_tokens_total", expert=d) == want_tokens, d
    routed = [(routing or MOA_STRATEGY, ref) for model, routing, ref, _ in refs if model == MOA_NAME]
    for strategy in STRATEGIES:
        mine = [ref for s, ref in routed if s == strategy]
        assert delta_sum("moa_routing_decisions_total", strategy=strategy) == len(mine), strategy
        assert delta_sum("moa_routing_layer_decisions_total", strategy=strategy) == N_LAYERS * len(mine), strategy
        for d in {ref.domain for ref in mine}:
            want = sum(ref.domain == d for ref in mine)
            assert delta("moa_routing_decisions_total", domain=d, strategy=strategy) == want, (d, strategy)
        for d in {x for ref in mine for x in ref.layer_domains}:
            want = sum(ref.layer_domains.count(d) for ref in mine)
            assert delta("moa_routing_layer_decisions_total", domain=d, strategy=strategy) == want, (d, strategy)


# ---------------------------------------------------------------------------------------------
# SIGTERM
# ---------------------------------------------------------------------------------------------


def stream_in_thread(url, body, started: threading.Event, out: dict):
    """Stream a completion with httpx; out gets the events (or the exception)."""
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            out["status"] = r.status_code
            events = []
            for line in r.iter_lines():
                if line.startswith("data:"):
                    payload = line[5:].strip()
                    events.append(payload if payload == "[DONE]" else json.loads(payload))
                    started.set()
            out["events"] = events
    except Exception as exc:  # noqa: BLE001 - reported by the test
        out["error"] = exc
    finally:
        started.set()


def streamed_text(events) -> tuple[str, list]:
    chunks = [e for e in events if isinstance(e, dict) and e.get("choices")]
    text = "".join(c["choices"][0].get("text") or "" for c in chunks)
    finishes = [c["choices"][0].get("finish_reason") for c in chunks if c["choices"][0].get("finish_reason")]
    return text, finishes


def test_sigterm_finishes_in_flight_requests_and_exits_0(tiny_chat, gen):
    args = tiny_server_args(tiny_chat, "--max-batch", "4", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S))
    server = Server(args)
    try:
        url = server.url
        short_prompt, long_prompt = random_text(gen), random_text(gen)
        short_n = 301  # well under a second alone: it finishes inside the shutdown timeout
        short = {"model": "base", "prompt": short_prompt, "max_tokens": short_n, "ignore_eos": True, "temperature": 0}
        long = {**short, "prompt": long_prompt, "max_tokens": MAX_SEQ_LEN - 100, "model": choose(gen, EXPERTS)}
        outs, threads = [], []
        for body in (long, short):
            out, started = {}, threading.Event()
            t = threading.Thread(target=stream_in_thread, args=(url, {**body, "stream": True}, started, out))
            t.start()
            assert started.wait(60), "no first chunk"
            outs.append(out)
            threads.append(t)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        problems = []  # every way the shutdown went wrong, reported together
        try:
            r = httpx.post(f"{url}/v1/completions", json={**short, "max_tokens": 3}, timeout=10)
            if r.status_code != 503:
                problems.append(f"a new request after SIGTERM got {r.status_code}, not 503: {r.text[:200]}")
        except httpx.TransportError:
            pass  # the listening socket is closed already: refused, also fine
        try:
            r = httpx.get(f"{url}/health", timeout=10)
            if r.status_code != 503:
                problems.append(f"/health after SIGTERM got {r.status_code}, not 503")
        except httpx.TransportError:
            pass
        try:
            rc = server.proc.wait(SHUTDOWN_TIMEOUT_S + EXIT_MARGIN_S)
        except subprocess.TimeoutExpired:
            rc = None
        elapsed = time.monotonic() - t0
        for t in threads:
            t.join(30)
    finally:
        server.kill()
    if rc != 0:
        problems.append(f"exit code {rc} after SIGTERM, {elapsed:.1f} s later (timeout {SHUTDOWN_TIMEOUT_S} s)")
    for name, out in zip(("long", "short"), outs):
        if "error" in out:
            problems.append(f"the {name} stream broke: {out['error']!r}")
        elif out.get("status") != 200 or not out["events"] or out["events"][-1] != "[DONE]":
            tail = out.get("events", [])[-2:]
            problems.append(f"the {name} stream did not end cleanly (status {out.get('status')}, last events {tail})")
    if "events" in outs[1]:
        text, finishes = streamed_text(outs[1]["events"])
        ref = solo(tiny_chat.engine(), short_prompt, short_n, chat=False, model="base", ignore_eos=True)
        if text != ref.text or finishes != ["length"]:
            problems.append(f"the short in-flight request did not complete: finish {finishes}, {len(text)} characters")
    if "events" in outs[0]:
        _, finishes = streamed_text(outs[0]["events"])
        if len(finishes) > 1:
            problems.append(f"the long stream has several finish_reasons: {finishes}")
    assert not problems, "\n".join(problems) + "\n" + server.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# The real default model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_server():
    with running_server(["--max-batch", "4"]) as server:
        yield server


@pytest.mark.slow
def test_default_model_lists_and_chats_as_the_engine(default_server, gen):
    from moa_engine.models import DEFAULT_MODEL

    client = default_server.client(timeout=120)
    models = client.models.list().data
    assert [m.id for m in models] == [DEFAULT_MODEL, "base"]
    assert [extra(m, "parent") for m in models] == [None, DEFAULT_MODEL]
    engine = moa_engine.Engine(max_batch=2)
    cases = [[{"role": "user", "content": "What is the capital of France?"}], random_messages(gen)]
    for messages in cases:
        n = odd(gen, 17, 31)
        r = client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, max_tokens=n, temperature=0)
        [ref] = engine.generate([messages], moa_engine.SamplingParams(max_new_tokens=n, temperature=0), chat=True)
        c = r.choices[0]
        assert c.message.content == ref.text
        assert c.finish_reason == ref.finish_reason
        assert extra(c, "domain") == "base"
        assert_usage("default model", r.usage, len(ref.prompt_token_ids), len(ref.token_ids))
    prompt = "The capital of France is"
    r = client.completions.create(model="base", prompt=prompt, max_tokens=11, temperature=0)
    [ref] = engine.generate([prompt], moa_engine.SamplingParams(max_new_tokens=11, temperature=0))
    assert r.choices[0].text == ref.text and r.usage.completion_tokens == len(ref.token_ids)
