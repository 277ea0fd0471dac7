"""Serving many adapters over one base: the completions engine and its HTTP server."""

from lorakit.serve.engine import Engine, RequestError
from lorakit.serve.server import make_server

__all__ = ["Engine", "RequestError", "make_server"]
