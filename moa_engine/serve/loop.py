"""The engine loop: one thread owns the Engine and steps it; HTTP handlers only submit and cancel.

Every request from any client joins the running batch at the next step (continuous batching):
nobody waits for a batch to finish. The loop thread hands each step's tokens to the asyncio
event loop in one call, where each request's Job turns them into text.

    loop = EngineLoop(engine, metrics)
    loop.start(asyncio.get_running_loop())
    queue = loop.submit([Job(prompt_ids, sampling, "code", None)])  # joins at the next step
    job, update = await queue.get()         # (job, Update): tokens, routing, the end
    loop.cancel(job)                        # a client hung up
    loop.stop(timeout)                                         # drain, then cancel the rest
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from moa_engine.engine import Engine, SamplingParams
from moa_engine.routing import BASE, ROUTE
from moa_engine.serve.detok import IncrementalText
from moa_engine.serve.metrics import ServerMetrics


@dataclass
class Update:
    """What one step did for one job: the new token (if any), the routing (first update only),
    and whether the job ended, and how."""

    tokens: list[int]
    routing: object | None = None
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Job:
    """One sequence in the engine: a choice of one HTTP request."""

    prompt_ids: list[int]
    sampling: SamplingParams
    domain: str | None  # an expert, BASE, or ROUTE
    routing: str | None  # the strategy when routed (None: the engine's)
    arrival: float = field(default_factory=time.monotonic)
    # Set by the loop thread.
    request_id: int | None = None
    served_by: str | None = None  # the expert that served it (base, mixed), from the routing
    routed: bool = False  # the routers chose (the request named no expert, and there are routers)
    layer_domains: list[str] = field(default_factory=list)
    strategy: str | None = None  # the routing strategy that chose, when routed
    stop_hit: bool = False  # a stop string showed in the text: cancelled, reported as "stop"
    stop_watch: IncrementalText | None = None  # the loop's view of the text, with stop strings
    first_token_at: float | None = None
    last_token_at: float | None = None
    done: bool = False
    _queue: asyncio.Queue | None = None  # where its updates go, as (job, Update)

    def served_domain(self) -> str:
        """The expert that served it (base, mixed): from the routing once known, else as named."""
        if self.served_by:
            return self.served_by
        return self.domain if self.domain is not ROUTE else BASE


class EngineLoop:
    def __init__(self, engine: Engine, metrics: ServerMetrics, max_queue: int = 256):
        self.engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._inbox: deque = deque()  # ("submit" | "cancel" | "cancel_all", job), in order
        self._jobs: dict[int, Job] = {}  # request id -> job, while in the engine
        self._pending = 0  # jobs accepted but without a first token yet (inbox + engine queue)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._aloop: asyncio.AbstractEventLoop | None = None
        self.failure: BaseException | None = None  # what killed the loop thread, if anything

    # -- the asyncio side -------------------------------------------------------------------
    def start(self, aloop: asyncio.AbstractEventLoop) -> None:
        self._aloop = aloop
        self._thread = threading.Thread(target=self._run, name="moa-engine-loop", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def try_reserve(self, n: int) -> bool:
        """Room for n more waiting jobs under max_queue (taken now, so that clients racing for
        the last places cannot overfill it)."""
        with self._cond:
            if self._pending + n > self.max_queue:
                return False
            self._pending += n
            return True

    def submit(self, jobs: list[Job]) -> asyncio.Queue:
        """Queues the jobs, whose places try_reserve took, for the next step; their updates
        arrive in the returned queue as (job, Update). Call from the event loop."""
        queue = asyncio.Queue()
        with self._cond:
            for job in jobs:
                job._queue = queue
                self._inbox.append(("submit", job))
            self._cond.notify()
        return queue

    def cancel(self, job: Job) -> None:
        """Ends the job at the next step (no-op once it ended)."""
        if job.done:
            return
        with self._cond:
            self._inbox.append(("cancel", job))
            self._cond.notify()

    def cancel_all(self) -> None:
        """Ends every job at the next step (thread-safe): a shutdown whose time is up."""
        with self._cond:
            self._inbox.append(("cancel_all", None))
            self._cond.notify()

    def stop(self, timeout: float) -> None:
        """Lets running jobs finish for up to `timeout` seconds, then cancels the rest and ends
        the thread."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self._jobs or self._inbox) and self._thread.is_alive():
            time.sleep(0.02)
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, timeout))

    # -- the loop thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._inbox and not self._jobs and not self._stopping:
                        self._cond.wait()
                    commands = list(self._inbox)
                    self._inbox.clear()
                    stopping = self._stopping
                for kind, job in commands:
                    if kind == "submit":
                        self._submit(job)
                    elif kind == "cancel":
                        self._cancel(job)
                    else:  # "cancel_all"
                        for rid in list(self._jobs):
                            self.engine.cancel(rid)
                if stopping:
                    self._cancel_all()
                    return
                if self._jobs:
                    self._step()
        except BaseException as exc:  # noqa: BLE001 - reported to every job, then to /health
            self.failure = exc
            self._fail_all(f"the engine loop failed: {type(exc).__name__}: {exc}")
            raise

    def _submit(self, job: Job) -> None:
        try:
            job.request_id = self.engine.submit(job.prompt_ids, job.sampling, domain=job.domain, routing=job.routing)
        except (ValueError, RuntimeError) as exc:  # e.g. an expert unloaded since the handler checked
            self._release(job)
            self._post([(job, Update([], finished=True, finish_reason="error", error=str(exc)))])
            return
        self._jobs[job.request_id] = job
        if job.sampling.stop:
            job.stop_watch = IncrementalText(self.engine.completion_text, job.sampling.stop)
        self.metrics.prompt_tokens.inc(len(job.prompt_ids))

    def _cancel(self, job: Job) -> None:
        if job.request_id in self._jobs:  # not refused at submit, not ended
            self.engine.cancel(job.request_id)

    def _step(self) -> None:
        events = self.engine.step()
        now = time.monotonic()
        updates: dict[Job, Update] = {}
        for e in events:
            job = self._jobs.get(e.request_id)
            if job is None:
                continue
            u = updates.setdefault(job, Update([]))
            if e.routing is not None:
                u.routing = e.routing
                self._routed(job, e.routing)
            if e.token >= 0:
                u.tokens.append(e.token)
                self._token(job, e.token, now)
            if e.finished:
                self._finish(job, u, e, now)
        for job, u in updates.items():  # stop strings: the text decides, as Engine.generate does
            if job.stop_watch is not None and not u.finished and u.tokens:
                job.stop_watch.add(u.tokens)
                if job.stop_watch.stopped:
                    job.stop_hit = True
                    self.engine.cancel(job.request_id)
        self.metrics.running.set(sum(1 for j in self._jobs.values() if j.first_token_at is not None))
        self.metrics.waiting.set(self._pending)
        self._post(list(updates.items()))

    def _routed(self, job: Job, routing) -> None:
        job.served_by = routing.domain
        if job.domain is ROUTE and len(routing.router_probs) > 0:
            job.routed, job.strategy = True, job.routing or self.engine.routing or "per_layer"
            strategy = job.strategy
            job.layer_domains = list(routing.layer_domains)
            self.metrics.routing.labels(routing.domain, strategy).inc()
            for d in routing.layer_domains:
                self.metrics.layer_routing.labels(d, strategy).inc()

    def _token(self, job: Job, token: int, now: float) -> None:
        if job.first_token_at is None:
            job.first_token_at = now
            self.metrics.ttft.observe(now - job.arrival)
            with self._cond:
                self._pending -= 1
        else:
            self.metrics.itl.observe(now - job.last_token_at)
        job.last_token_at = now
        self.metrics.generation_tokens.inc()
        self.metrics.expert_tokens.labels(job.served_by or BASE).inc()

    def _finish(self, job: Job, u: Update, e, now: float) -> None:
        reason = "stop" if job.stop_hit else e.finish_reason
        error = getattr(e, "error", None) or None
        u.finished, u.finish_reason, u.error = True, reason, error
        del self._jobs[e.request_id]
        if job.first_token_at is None:
            self._release(job)
        self.metrics.requests.labels(reason if reason in ("stop", "length", "cancelled") else "error").inc()
        self.metrics.expert_requests.labels(job.served_by or BASE).inc()
        self.metrics.latency.observe(now - job.arrival)

    def _release(self, job: Job) -> None:
        with self._cond:
            self._pending -= 1

    def _cancel_all(self) -> None:
        for rid in list(self._jobs):
            self.engine.cancel(rid)
        deadline = time.monotonic() + 5.0
        while self._jobs and time.monotonic() < deadline:
            self._step()

    def _fail_all(self, message: str) -> None:
        jobs = list(self._jobs.values()) + [job for kind, job in self._inbox if kind == "submit"]
        self._jobs.clear()
        self._post([(j, Update([], finished=True, finish_reason="error", error=message)) for j in jobs])

    def _post(self, updates: list[tuple[Job, Update]]) -> None:
        """Hands a step's updates to the asyncio loop in one call."""
        for job, u in updates:
            if u.finished:
                job.done = True
        if updates and self._aloop is not None and not self._aloop.is_closed():
            self._aloop.call_soon_threadsafe(_deliver, updates)


def _deliver(updates: list[tuple[Job, Update]]) -> None:
    for job, u in updates:
        job._queue.put_nowait((job, u))
