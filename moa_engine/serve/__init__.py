"""`moa serve`: an OpenAI-compatible HTTP server over one Engine.

    from moa_engine import Engine
    from moa_engine.serve import create_app, run
    engine = Engine(experts="my_moa")
    run(engine, host="127.0.0.1", port=8000)        # blocks, as `moa serve` does
    app = create_app(engine)                          # or the FastAPI app, for your own ASGI server

Each expert is a model (`model: "code"`), as in vLLM and LoRAX; the served name lets the MoA
routers choose; `base` is the model without experts. One thread owns the engine; every
client's request joins the running batch. docs/server.md describes the API.
"""

__all__ = ["EngineLoop", "create_app", "run"]


def __getattr__(name):
    # Imported on first use, so that `moa`'s other subcommands do not load FastAPI and uvicorn.
    if name == "create_app":
        from moa_engine.serve.app import create_app

        return create_app
    if name == "EngineLoop":
        from moa_engine.serve.loop import EngineLoop

        return EngineLoop
    if name == "run":
        from moa_engine.serve.runner import run

        return run
    raise AttributeError(f"module 'moa_engine.serve' has no attribute {name!r}")
