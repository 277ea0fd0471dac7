"""Serving many adapters over one base: the batched completions engine and its OpenAI-compatible HTTP API.

The HTTP front end (`Server`, `make_app`) needs fastapi; it is imported when first asked for, so the engine
runs where fastapi is not installed (a GPU image without it: `tests/test_gpu.py` serves through the engine).
"""

from lorakit.serve.engine import Engine, RequestError

__all__ = ["Engine", "RequestError", "Server", "make_app"]


def __getattr__(name: str):
    if name in ("Server", "make_app"):
        from lorakit.serve import server  # late: it imports fastapi, which is optional (see above)

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
