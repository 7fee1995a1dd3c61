"""A real OpenAI-compatible judge server on 127.0.0.1 for tests: `GET /v1/models` and
`POST /v1/chat/completions`, served by a ThreadingHTTPServer in a background thread on an
ephemeral port.

It checks what a real server would reject (the model name; every image an `image_url` part
holding a PNG data URL; text parts as strings) and answers every check the prompt asks
(it reads the `<IF>` / `<IF_score>`-style tags out of the prompt) in the judge's tag format.
Tests steer it three ways:

- `script`: a queue of reply specs consumed one per request, in order —
  `{"kind": "answer", "value": "yes" | "no" | 1..5}` a well-formed reply,
  `{"kind": "fault", "fault": kind}` a faulty reply of one of the `FAULTS` kinds,
  `{"kind": "text", "text": ...}` a literal reply,
  `{"kind": "choices", "texts": [...]}` several choices (votes),
  `{"kind": "http", "status": 500}` an HTTP error,
  `{"kind": "stall", "seconds": s}` answer only after `s` seconds (past a client's timeout);
- `fault_rate`: when the script is empty, a deterministic share of requests (by a hash of
  the request's text and images) get a faulty reply of a kind drawn from `fault_kinds`
  (also by the hash); every kind spoils the IF answer (`FAULTS_ALL_CHECKS` spoil every
  asked check); `faults` records each one;
- `delay`: seconds every reply waits (to show that concurrent clients overlap).

With `logprobs` the server returns per-character tokens with `top_logprobs`; at a score
digit the alternatives follow `digit_probs`. It counts requests (`n_requests`) and keeps
every request body (`requests`).

Run it by hand with `python tests/loopback_judge_server.py --port 8000` to point
`--judge vlm:http://127.0.0.1:8000/v1` at it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PNG_PREFIX = "data:image/png;base64,"
# faulty replies: the first three leave every asked check unanswered, the last two spoil only IF
FAULTS = ("malformed", "refusal", "empty", "conflict", "bad_value")
FAULTS_ALL_CHECKS = ("malformed", "refusal", "empty")
_ASKED = re.compile(r"<(IF|CC|GA|CU)(_score)?>")


class LoopbackJudgeServer:
    def __init__(self, model: str = "loopback-vlm", delay: float = 0.0, fault_rate: float = 0.0,
                 fault_kinds: tuple[str, ...] = tuple(FAULTS), honor_n: bool = True, logprobs: bool = True,
                 answer: Any = "yes", digit_probs: dict[str, float] | None = None, port: int = 0) -> None:
        self.model, self.delay, self.fault_rate, self.fault_kinds = model, delay, fault_rate, fault_kinds
        self.honor_n, self.logprobs, self.answer = honor_n, logprobs, answer
        self.digit_probs = digit_probs or {"3": 0.1, "4": 0.6, "5": 0.3}
        self.script: deque[dict[str, Any]] = deque()
        self.requests: list[dict[str, Any]] = []
        self.faults: list[str] = []
        self.n_requests = 0
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._port = port
        self._httpd: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "LoopbackJudgeServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                with server._lock:
                    server._in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server._in_flight)
                try:
                    status, body = server.handle_chat(raw)
                    self._send(status, body)
                finally:
                    with server._lock:
                        server._in_flight -= 1

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:  # quiet on client hang-ups
                pass

        self._httpd = Server(("127.0.0.1", self._port), Handler)
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self) -> "LoopbackJudgeServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def reset(self, **settings: Any) -> None:
        """Forget requests, faults and script; optionally change settings (delay, fault_rate, ...)."""
        with self._lock:
            self.script.clear()
            self.requests.clear()
            self.faults.clear()
            self.n_requests = 0
            self.max_in_flight = 0
            for k, v in settings.items():
                if not hasattr(self, k):
                    raise AttributeError(k)
                setattr(self, k, v)

    # ------------------------------------------------------------------ requests
    def check_request(self, body: Any) -> str | None:
        """Why a request is malformed, or None."""
        if not isinstance(body, dict):
            return "body is not a JSON object"
        if body.get("model") != self.model:
            return f"model {body.get('model')!r} not found"
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return "messages must be a non-empty list"
        n_images = 0
        for m in msgs:
            if m.get("role") not in ("system", "user", "assistant"):
                return f"bad role {m.get('role')!r}"
            content = m.get("content")
            if isinstance(content, str):
                continue
            for part in content:
                if part.get("type") == "text":
                    if not isinstance(part.get("text"), str):
                        return "text part without text"
                elif part.get("type") == "image_url":
                    url = (part.get("image_url") or {}).get("url", "")
                    if not url.startswith(PNG_PREFIX):
                        return "image_url is not a PNG data URL"
                    if not base64.b64decode(url[len(PNG_PREFIX):]).startswith(b"\x89PNG\r\n\x1a\n"):
                        return "image data is not a PNG"
                    n_images += 1
                else:
                    return f"unknown content part {part.get('type')!r}"
        probe = len(msgs) == 1 and isinstance(msgs[0].get("content"), str)
        if n_images == 0 and not probe:
            return "no image in the request"
        if not isinstance(body.get("max_tokens", 1), int) or body.get("n", 1) < 1:
            return "bad max_tokens or n"
        return None

    @staticmethod
    def prompt_text(body: dict[str, Any]) -> str:
        out = []
        for m in body["messages"]:
            c = m["content"]
            out += [c] if isinstance(c, str) else [p["text"] for p in c if p.get("type") == "text"]
        return "\n".join(out)

    @staticmethod
    def request_key(body: dict[str, Any]) -> str:
        """A content hash of the request's texts and images (not of its sampling settings)."""
        h = hashlib.sha256()
        for m in body["messages"]:
            c = m["content"]
            for p in [{"type": "text", "text": c}] if isinstance(c, str) else c:
                h.update((p.get("text") or (p.get("image_url") or {}).get("url", "")).encode())
        return h.hexdigest()

    def well_formed(self, body: dict[str, Any], value: Any = None) -> str:
        text = self.prompt_text(body)
        asked = list(dict.fromkeys(m.group(1) for m in _ASKED.finditer(text)))
        graded = "_score>" in text
        value = self.answer if value is None else value
        if not asked:   # not a judge prompt (e.g. a client's load-time probe)
            return "3"
        lines = []
        for c in asked:
            v = value(c, body) if callable(value) else value
            if graded:
                v = v if isinstance(v, int) else (5 if v == "yes" else 1)
                lines.append(f"<{c}_score>{v}</{c}_score><{c}_reason>scored {v} by the loopback judge</{c}_reason>")
            else:
                lines.append(f"<{c}>{v}</{c}><{c}_reason>the loopback judge says {v}</{c}_reason>")
        return "\n".join(lines)

    def fault_text(self, kind: str, body: dict[str, Any]) -> str:
        """A faulty reply of the given kind to this request."""
        if kind == "malformed":
            return "The edit looks fine to me, nothing else to add."
        if kind == "refusal":
            return "I'm sorry, but I can't help with evaluating these images."
        if kind == "empty":
            return ""
        good = self.well_formed(body)
        graded = "_score>" in self.prompt_text(body)
        if kind == "conflict":   # a second, contradicting IF answer
            return good + ("\n<IF_score>1</IF_score>" if graded else "\n<IF>no</IF>")
        if kind == "bad_value":  # IF answered with a value outside the allowed ones
            return re.sub(r"<IF_score>\d+</IF_score>", "<IF_score>7</IF_score>",
                          re.sub(r"<IF>\w+</IF>", "<IF>maybe</IF>", good))
        raise ValueError(f"unknown fault {kind!r}")

    def _logprobs(self, text: str) -> dict[str, Any]:
        tokens = []
        for i, ch in enumerate(text):
            if ch.isdigit() and text[:i].endswith("_score>"):
                top = [{"token": d, "logprob": math.log(p)} for d, p in self.digit_probs.items()]
                tokens.append({"token": ch, "logprob": math.log(self.digit_probs.get(ch, 1e-9)), "top_logprobs": top})
            else:
                tokens.append({"token": ch, "logprob": 0.0, "top_logprobs": [{"token": ch, "logprob": 0.0}]})
        return {"content": tokens}

    def handle_chat(self, raw: bytes) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.n_requests += 1
        try:
            body = json.loads(raw)
        except ValueError:
            return 400, {"error": {"message": "invalid JSON"}}
        why = self.check_request(body)
        if why is not None:
            return (404 if "not found" in why else 400), {"error": {"message": why}}
        with self._lock:
            self.requests.append(body)
            spec = self.script.popleft() if self.script else None
        if self.delay:
            time.sleep(self.delay)
        n = int(body.get("n", 1)) if self.honor_n else 1
        if spec is None:
            u = int(self.request_key(body)[:8], 16) / 16 ** 8
            if u < self.fault_rate:
                kind = self.fault_kinds[int(self.request_key(body)[8:16], 16) % len(self.fault_kinds)]
                with self._lock:
                    self.faults.append(kind)
                texts = [self.fault_text(kind, body)] * n
            else:
                texts = [self.well_formed(body)] * n
        elif spec["kind"] == "answer":
            texts = [self.well_formed(body, spec["value"])] * n
        elif spec["kind"] == "fault":
            texts = [self.fault_text(spec["fault"], body)] * n
        elif spec["kind"] == "text":
            texts = [spec["text"]] * n
        elif spec["kind"] == "choices":
            texts = list(spec["texts"])[:n] if self.honor_n else list(spec["texts"])[:1]
        elif spec["kind"] == "http":
            return int(spec["status"]), {"error": {"message": f"scripted HTTP {spec['status']}"}}
        elif spec["kind"] == "stall":
            self._stop.wait(float(spec["seconds"]))
            texts = [self.well_formed(body)] * n
        else:
            raise ValueError(f"unknown script kind {spec['kind']!r}")
        want_lp = bool(body.get("logprobs")) and self.logprobs
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop",
                    "logprobs": self._logprobs(t) if want_lp else None} for i, t in enumerate(texts)]
        return 200, {"id": f"chatcmpl-{self.n_requests}", "object": "chat.completion", "model": self.model,
                     "choices": choices, "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model", default="loopback-vlm")
    ap.add_argument("--fault-rate", type=float, default=0.0)
    ap.add_argument("--delay", type=float, default=0.0)
    a = ap.parse_args()
    srv = LoopbackJudgeServer(model=a.model, fault_rate=a.fault_rate, delay=a.delay, port=a.port).start()
    print(f"serving {srv.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()
