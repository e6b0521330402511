"""The OpenAI-compatible HTTP face of one Engine (FastAPI).

`model` names the served model (routed by the MoA routers when there are any), an expert, or
`base`. Handlers parse and check a request, turn it into one Job per choice, hand the jobs to
the engine loop and stream or collect what the loop sends back; no model logic runs here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import moa_engine
from moa_engine.engine import Engine, SamplingParams
from moa_engine.routing import BASE, ROUTE
from moa_engine.serve.detok import IncrementalText
from moa_engine.serve.loop import EngineLoop, Job, Update
from moa_engine.serve.metrics import ServerMetrics
from moa_engine.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
    validation_message,
)

SYSTEM_FINGERPRINT = f"moa_engine-{moa_engine.__version__}"
_DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


def default_served_name(engine: Engine) -> str:
    """The MoA directory's folder name, else the model folder's or GGUF file's (the default
    model's name for its file)."""
    if engine.moa_dir is not None:
        return Path(engine.moa_dir.path).resolve().name
    path = Path(engine.model_path)
    if path.suffix.lower() == ".gguf":
        from moa_engine.models import DEFAULT_MODEL, default_gguf_path

        return DEFAULT_MODEL if path.resolve() == default_gguf_path().resolve() else path.stem
    name = path.name
    return name.split("--")[0] if "--" in name else name


class Server:
    """The app's state: the engine, its loop, the metrics and the options."""

    def __init__(self, engine, served_model_name, api_key, max_queue, allow_runtime_experts, shutdown_timeout):
        self.engine = engine
        # The expert list and whether there are routers, kept here: the engine's own getters take
        # its lock, which a step holds for its whole length (seconds for a long prefill), and the
        # event loop must never wait on it. Only this app's routes change the experts.
        self.experts = list(engine.experts)
        self.routed = bool(engine.router_domains)
        self.name = served_model_name or default_served_name(engine)
        if self.name == BASE or self.name in self.experts:
            raise ValueError(
                f"served model name {self.name!r} clashes with {'base' if self.name == BASE else 'an expert'}"
            )
        self.api_key = api_key or None
        self.allow_runtime_experts = allow_runtime_experts
        self.shutdown_timeout = shutdown_timeout
        self.metrics = ServerMetrics()
        self.loop = EngineLoop(engine, self.metrics, max_queue=max_queue)
        self.draining = False
        self.created = int(time.time())

    # -- models ---------------------------------------------------------------------------
    def models(self) -> list[dict]:
        def card(name, parent):
            return {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "moa_engine",
                "root": str(self.engine.model_path) if parent is None else name,
                "parent": parent,
                "max_model_len": self.engine.max_seq_len,
            }

        return [card(self.name, None)] + [card(e, self.name) for e in self.experts] + [card(BASE, self.name)]

    def domain_of(self, model: str):
        """The engine domain a request's `model` names."""
        if model == self.name:
            return ROUTE if self.routed else BASE
        if model == BASE or model in self.experts:
            return model
        known = ", ".join(repr(m["id"]) for m in self.models())
        raise APIError(
            404, f"the model {model!r} does not exist; the known models are {known}", "model", "model_not_found"
        )

    # -- requests -----------------------------------------------------------------------
    def jobs_for(self, body, chat: bool) -> tuple[list[Job], list[int]]:
        """One job per choice (prompt-major, as OpenAI orders them) and each prompt's length."""
        domain = self.domain_of(body.model)
        if body.routing is not None and not self.routed:
            raise APIError(400, f"routing={body.routing!r} was given, but the model has no routers", "routing")
        field = "messages" if chat else "prompt"
        try:
            prompts = (
                [self.engine.encode(body.message_dicts(), chat=True)]
                if chat
                else [self.engine.encode(p) for p in body.prompts()]
            )
        except ValueError as exc:
            raise APIError(400, str(exc), field) from None
        limit = body.token_limit if chat else body.max_tokens
        jobs = []
        for ids in prompts:
            room = self.engine.max_seq_len - len(ids)
            if room < 1:
                raise APIError(
                    400,
                    f"the prompt has {len(ids)} tokens, and this model's context is {self.engine.max_seq_len}",
                    field,
                )
            if limit is not None and limit > room:
                raise APIError(
                    400,
                    f"the prompt ({len(ids)} tokens) plus max_tokens ({limit}) exceeds the model's context of "
                    f"{self.engine.max_seq_len} tokens",
                    "max_tokens",
                )
            for i in range(body.n):
                sampling = SamplingParams(
                    max_new_tokens=limit if limit is not None else room,
                    temperature=body.temperature,
                    top_k=body.top_k,
                    top_p=body.top_p,
                    seed=None if body.seed is None else (body.seed + i) % 2**64,
                    stop=tuple(body.stop or ()),
                    ignore_eos=body.ignore_eos,
                )
                jobs.append(Job(ids, sampling, domain, body.routing))
        return jobs, [len(ids) for ids in prompts]

    def accept(self, jobs: list[Job]) -> asyncio.Queue:
        if self.draining or not self.loop.alive:
            raise APIError(503, "the server is shutting down" if self.draining else "the engine loop has stopped")
        if not self.loop.try_reserve(len(jobs)):
            self.metrics.requests.labels("rejected").inc(len(jobs))
            raise APIError(
                429, f"the queue is full ({self.loop.max_queue} requests waiting); retry later", code="queue_full"
            )
        return self.loop.submit(jobs)


def _choice_extra(job: Job) -> dict:
    """The MoA fields of a choice: the expert that served it, and how it was routed."""
    extra = {"domain": job.served_domain()}
    if job.routed:
        extra["layer_domains"] = list(job.layer_domains)
        extra["routing"] = job.strategy
    return extra


def _end_error(update: Update) -> APIError | None:
    if update.finish_reason == "error":
        return APIError(500, update.error or "the engine failed the request", code="engine_error")
    if update.finish_reason == "cancelled":
        return APIError(503, "the request was cancelled: the server is shutting down", code="cancelled")
    return None


async def _collect(server: Server, request: Request, jobs: list[Job], queue: asyncio.Queue) -> dict[Job, Update] | None:
    """Waits for every job's end (their tokens gathered in the last update); None when the
    client hung up first (the caller cancels the jobs). The client is looked at every
    _DISCONNECT_POLL_S, whether or not tokens came meanwhile."""
    tokens = {job: [] for job in jobs}
    ends: dict[Job, Update] = {}
    loop = asyncio.get_running_loop()
    next_check = loop.time() + _DISCONNECT_POLL_S
    while len(ends) < len(jobs):
        try:
            job, update = await asyncio.wait_for(queue.get(), max(0.0, next_check - loop.time()))
        except asyncio.TimeoutError:
            job = update = None
        if loop.time() >= next_check:
            if await request.is_disconnected():
                return None
            next_check = loop.time() + _DISCONNECT_POLL_S
        if update is None:
            continue
        tokens[job] += update.tokens
        if update.finished:
            ends[job] = update
    for job in jobs:
        ends[job].tokens = tokens[job]
    return ends


def _usage(prompt_lens: list[int], completion_tokens: int) -> dict:
    prompt = sum(prompt_lens)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def _reply(server: Server, body, chat: bool, rid: str, created: int, jobs, ends, prompt_lens) -> dict:
    choices = []
    for index, job in enumerate(jobs):
        end = ends[job]
        text = server.engine.completion_text(end.tokens, job.sampling.stop) or ""
        choice = {"index": index}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice |= {"logprobs": None, "finish_reason": end.finish_reason, **_choice_extra(job)}
        choices.append(choice)
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": body.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
        "usage": _usage(prompt_lens, sum(len(ends[j].tokens) for j in jobs)),
    }


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


async def _stream(server: Server, body, chat: bool, rid: str, created: int, jobs, queue, prompt_lens):
    """Server-sent events: a chunk per piece of text, a last chunk per choice with its
    finish_reason, the usage chunk when asked, then [DONE]. A client that hangs up cancels
    the jobs (the generator is cancelled at its await; `finally` runs)."""
    index = {job: i for i, job in enumerate(jobs)}
    texts = {job: IncrementalText(server.engine.completion_text, job.sampling.stop) for job in jobs}
    started: set[Job] = set()
    finished: set[Job] = set()
    head = {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": body.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }

    def chunk(job, text: str | None, finish_reason=None, first=False) -> bytes:
        choice = {"index": index[job]}
        if chat:
            delta = {"role": "assistant", "content": text or ""} if first else {}
            if text and not first:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice |= {"logprobs": None, "finish_reason": finish_reason}
        if first:
            choice |= _choice_extra(job)
        return _sse({**head, "choices": [choice]})

    try:
        while len(finished) < len(jobs):
            job, update = await queue.get()
            if job not in started:
                started.add(job)
                yield chunk(job, "" if chat else None, first=True)
            if update.finished and (error := _end_error(update)) is not None:
                yield _sse(error.body())
                yield b"data: [DONE]\n\n"
                return
            text = texts[job]
            text.add(update.tokens)
            piece = text.piece()
            if update.finished:
                piece += text.last_piece(server.engine.completion_text(text.tokens, job.sampling.stop) or "")
            if piece:
                yield chunk(job, piece)
            if update.finished:
                finished.add(job)
                yield chunk(job, None, update.finish_reason)
        if body.include_usage:
            usage = _usage(prompt_lens, sum(len(t.tokens) for t in texts.values()))
            yield _sse({**head, "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"
    finally:
        for job in jobs:
            if job not in finished:
                server.loop.cancel(job)


async def _complete(server: Server, request: Request, body, chat: bool):
    jobs, prompt_lens = server.jobs_for(body, chat)
    queue = server.accept(jobs)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        return StreamingResponse(
            _stream(server, body, chat, rid, created, jobs, queue, prompt_lens),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    ends = None
    try:
        ends = await _collect(server, request, jobs, queue)
    finally:
        for job in jobs:
            if not job.done:
                server.loop.cancel(job)
    if ends is None:  # nobody to answer
        return Response(status_code=499)
    for job in jobs:
        if (error := _end_error(ends[job])) is not None:
            raise error
    return _reply(server, body, chat, rid, created, jobs, ends, prompt_lens)


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


class _Auth:
    """With an API key set, every route but /health needs `Authorization: Bearer KEY` (401)."""

    def __init__(self, app, server: Server):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.server.api_key and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, key = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                key.strip().encode(), self.server.api_key.encode()
            ):
                what = "no API key was given" if not given else "the API key is not valid"
                error = APIError(401, f"{what}: send 'Authorization: Bearer KEY'", code="invalid_api_key")
                return await _error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(
    engine: Engine,
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_queue: int = 256,
    allow_runtime_experts: bool = False,
    shutdown_timeout: float = 10.0,
) -> FastAPI:
    """The OpenAI-compatible app over `engine`; its engine loop runs while the app does
    (started and stopped by the app's lifespan)."""
    server = Server(engine, served_model_name, api_key, max_queue, allow_runtime_experts, shutdown_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.loop.start(asyncio.get_running_loop())
        yield
        server.draining = True
        # Under uvicorn the in-flight requests have had shutdown_timeout already (its graceful
        # shutdown) and the cancelled ones' jobs end at the next step; another ASGI server may
        # not drain, so the loop gives what is left that long again, then cancels it.
        await asyncio.to_thread(server.loop.stop, server.shutdown_timeout)

    app = FastAPI(title="moa_engine", version=moa_engine.__version__, lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
        return _error_response(APIError(400, message, param))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):  # a bug: still OpenAI's shape, never a bare 500 page
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return _error_response(APIError(exc.status_code, str(exc.detail)))

    # A plain ASGI middleware: starlette's BaseHTTPMiddleware (@app.middleware) wraps `receive`
    # in a way that hides a client's disconnect from the handlers, which need to see it.
    app.add_middleware(_Auth, server=server)

    @app.get("/health")
    async def health():
        if server.draining or not server.loop.alive:
            reason = "shutting down" if server.draining else f"engine loop stopped: {server.loop.failure!r}"
            return JSONResponse({"status": reason}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": server.models()}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _complete(server, request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _complete(server, request, body, chat=True)

    def runtime_experts_allowed():
        if not server.allow_runtime_experts:
            raise APIError(404, "runtime experts are off: start the server with --allow-runtime-experts")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadAdapterRequest):
        runtime_experts_allowed()
        name = body.lora_name
        if name in (BASE, server.name) or name in server.experts:
            raise APIError(400, f"the name {name!r} is taken (base, the served name, or a loaded expert)", "lora_name")
        try:
            await asyncio.to_thread(engine.add_expert, name, body.lora_path)
        except (ValueError, OSError) as exc:
            raise APIError(400, f"could not load {body.lora_path!r} as {name!r}: {exc}", "lora_path") from None
        server.experts.append(name)
        return {"status": "ok", "lora_name": name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadAdapterRequest):
        runtime_experts_allowed()
        if body.lora_name not in server.experts:
            known = ", ".join(repr(e) for e in server.experts) or "none"
            raise APIError(404, f"no expert named {body.lora_name!r} is loaded (loaded: {known})", "lora_name")
        server.experts.remove(body.lora_name)  # first: no new request names it from now on
        await asyncio.to_thread(engine.remove_expert, body.lora_name)
        return {"status": "ok", "lora_name": body.lora_name}

    return app
