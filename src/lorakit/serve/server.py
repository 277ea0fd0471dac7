"""A small OpenAI-compatible HTTP server on the standard library: `/v1/models`, `/v1/completions`,
`/v1/chat/completions`.

For one machine and a few clients (each request runs alone on the model); `stream: true` answers
as server-sent events. Binds to 127.0.0.1 unless told otherwise. Bodies over `max_body_bytes` are
refused without being parsed.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from lorakit.serve.engine import Engine, RequestError

MAX_BODY_BYTES = 1 << 20


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000,
                max_body_bytes: int = MAX_BODY_BYTES) -> ThreadingHTTPServer:
    """A server (not yet started: call `serve_forever`) answering for `engine`; port 0 picks a free one."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self.reply(200, engine.models())
            else:
                self.reply_error(404, f"no route {self.path}")

        def do_POST(self) -> None:
            chat = {"/v1/completions": False, "/v1/chat/completions": True}.get(self.path.rstrip("/"))
            if chat is None:
                self.reply_error(404, f"no route {self.path}")
                return
            try:
                job = engine.prepare(self.read_json(), chat)
            except RequestError as e:
                self.reply_error(e.status, str(e))
                return
            if job.params["stream"]:
                self.reply_events(engine.stream(job))
                return
            try:
                answer = engine.answer(job)
            except Exception as e:  # a fault of ours (an adapter file gone bad): say so, keep serving
                self.reply_error(500, f"{type(e).__name__}: {e}")
                return
            self.reply(200, answer)

        def read_json(self):
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise RequestError(411, "a Content-Length header is required") from None
            if length > max_body_bytes:
                self.discard(min(length, 16 * max_body_bytes))  # so that the client reads the answer, not a reset
                raise RequestError(413, f"request body of {length} bytes is over the limit of {max_body_bytes}")
            try:
                return json.loads(self.rfile.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"the request body is not valid JSON: {e}") from None

        def discard(self, length: int) -> None:
            while length > 0:
                chunk = self.rfile.read(min(length, 1 << 16))
                if not chunk:
                    return
                length -= len(chunk)

        def reply_error(self, status: int, message: str) -> None:
            kind = "invalid_request_error" if status < 500 else "server_error"
            self.close_connection = status in (411, 413)  # the unread body would follow on the connection
            self.reply(status, {"error": {"message": message, "type": kind, "code": status}})

        def reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status, HTTPStatus(status).phrase)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def reply_events(self, chunks: Generator[dict, None, None]) -> None:
            """Server-sent events, one `data:` line per chunk, then `data: [DONE]`; the connection then closes."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            try:
                try:
                    for chunk in chunks:
                        self.event(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    raise
                except Exception as e:  # a fault of ours mid-answer: the last event says so
                    self.event({"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error", "code": 500}})
                self.wfile.write(b"data: [DONE]\n\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client left: closing the chunks below stops the generation
            finally:
                chunks.close()

        def event(self, body: dict) -> None:
            self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
            self.wfile.flush()

        def log_message(self, format: str, *args) -> None:  # quiet: no line per request on stderr
            pass

    return ThreadingHTTPServer((host, port), Handler)
