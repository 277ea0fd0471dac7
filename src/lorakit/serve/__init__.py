"""Serving many adapters over one base: the batched completions engine and its OpenAI-compatible HTTP API."""

from lorakit.serve.engine import Engine, RequestError
from lorakit.serve.server import Server, make_app

__all__ = ["Engine", "RequestError", "Server", "make_app"]
