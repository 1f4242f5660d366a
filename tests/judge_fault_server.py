"""A small OpenAI-compatible server on a real loopback socket that produces the faults a real server will not
produce on demand. The behaviour is chosen by the request's `model`:

ok-N: score N, and "A" for every pairwise question   |  longer: prefers the longer answer (position-blind)
flaky-429: 429 with Retry-After: 1 first, then ok-7   |  flaky-500: 500 twice, then ok-7
slow: answers after 3 s                               |  malformed: an answer that is not JSON
Without response_format (free text): "Rating: [[N]]" with N as for ok-N (else 7); by-turn: 8 for a single-turn
    MT-Bench prompt, 3 for a multi-turn one; malformed: no rating at all
retry-after-soon, retry-after-date, retry-after-huge: 429 on every attempt, with a Retry-After header that is
    garbage ("soon"), an HTTP date an hour ahead, or 99999999999 seconds (about 3000 years)
"""

from __future__ import annotations

import email.utils
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RETRY_AFTER = {"retry-after-soon": lambda: "soon",
               "retry-after-date": lambda: email.utils.formatdate(time.time() + 3600, usegmt=True),
               "retry-after-huge": lambda: "99999999999"}


class FaultServer:
    def __init__(self):
        self.requests: list[dict] = []  # every request: model, authorization header, body
        self.attempts: Counter = Counter()
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                model, prompt = body["model"], body["messages"][-1]["content"]
                with server.lock:
                    server.requests.append({"model": model, "authorization": self.headers.get("Authorization"),
                                            "body": body})
                    server.attempts[(model, prompt)] += 1
                    attempt = server.attempts[(model, prompt)]
                if model == "flaky-429" and attempt == 1:
                    return self._send(429, b'{"error": "rate limited"}', {"Retry-After": "1"})
                if model in RETRY_AFTER:
                    return self._send(429, b'{"error": "rate limited"}', {"Retry-After": RETRY_AFTER[model]()})
                if model == "flaky-500" and attempt <= 2:
                    return self._send(500, b'{"error": "internal"}')
                if model == "slow":
                    time.sleep(3)
                # no response_format: a free-text answer (FastChat's MT-Bench prompts ask for "[[rating]]")
                kind = body["response_format"]["json_schema"]["name"] if "response_format" in body else "text"
                content = _answer(model, prompt, kind)
                reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
                self._send(200, json.dumps(reply).encode())

        return Handler


def _answer(model: str, prompt: str, kind: str) -> str:
    if model == "malformed":
        return "Score: 7/10, a fine answer."
    if kind == "text":
        score = int(model.split("-")[1]) if model.startswith("ok-") else 7
        if model == "by-turn":  # FastChat's multi-turn prompts show the whole conversation
            score = 3 if "Conversation with User|>" in prompt else 8
        return f"The answer is adequate. Rating: [[{score}]]"
    if kind == "score":
        score = int(model.split("-")[1]) if model.startswith("ok-") else 7
        return json.dumps({"score": score, "reasoning": "checked"})
    if model == "longer":
        a = re.search(r"^Answer A: (.*)$", prompt, re.MULTILINE).group(1)
        b = re.search(r"^Answer B: (.*)$", prompt, re.MULTILINE).group(1)
        return json.dumps({"winner": "tie" if len(a) == len(b) else ("A" if len(a) > len(b) else "B"),
                           "reasoning": "length"})
    return json.dumps({"winner": "A", "reasoning": "always A"})
