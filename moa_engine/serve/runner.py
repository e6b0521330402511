"""Running the app under uvicorn: a socket bound before the server starts (so that port 0
gets a free port), the ready line once it listens, and a graceful stop on SIGTERM/SIGINT.

The stop: new requests get 503 at once; requests in flight get shutdown_timeout seconds, then
the engine cancels what is left, so that every stream still ends with an error event and
[DONE] rather than a cut connection; uvicorn's own graceful timeout is a margin beyond that.
The process then exits 0: uvicorn re-raises the signal it caught once it is done, and the
handlers in place then are no-ops of ours, not the default that would kill the process."""

from __future__ import annotations

import signal
import socket
import sys
import threading
from contextlib import contextmanager

import uvicorn

from moa_engine.serve.app import create_app

READY = "moa serve: ready on"
_CANCEL_MARGIN_S = 5.0  # uvicorn's graceful-shutdown timeout beyond ours: time for the cancelled streams to end


class _Server(uvicorn.Server):
    """uvicorn's server, announcing itself when it listens and marking the app as draining
    (new requests get 503, /health too) as soon as a stop signal comes."""

    def __init__(self, config, app_server):
        super().__init__(config)
        self._app_server = app_server

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if not self.should_exit and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(f"{READY} http://{host}:{port}", file=sys.stderr, flush=True)

    def handle_exit(self, sig, frame):
        if not self._app_server.draining:
            self._app_server.draining = True
            timer = threading.Timer(self._app_server.shutdown_timeout, self._app_server.loop.cancel_all)
            timer.daemon = True
            timer.start()
        super().handle_exit(sig, frame)


@contextmanager
def _exit_quietly_on_signals():
    """SIGTERM and SIGINT handled by Python while uvicorn runs (and after, when it re-raises)."""
    signals = (signal.SIGTERM, signal.SIGINT)
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def run(engine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning", **options) -> None:
    """Serves `engine` until SIGTERM or SIGINT; options go to create_app (served_model_name,
    api_key, max_queue, allow_runtime_experts, shutdown_timeout). In-flight requests get
    shutdown_timeout seconds to finish; the rest are cancelled."""
    app = create_app(engine, **options)
    sock = _bind(host, port)
    config = uvicorn.Config(
        app,
        log_level=log_level,
        timeout_graceful_shutdown=app.state.server.shutdown_timeout + _CANCEL_MARGIN_S,
        access_log=False,
    )
    with _exit_quietly_on_signals():
        _Server(config, app.state.server).run(sockets=[sock])
