"""A client for judge models behind any OpenAI-compatible chat API: concurrent, retrying, budgeted, cached.

The API key is read from an environment variable at request time and sent only in the Authorization header;
it is not stored on the client, in the cache or in any result.
"""

from __future__ import annotations

import datetime
import email.utils
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from harness.core.files import write_json_atomic

RETRYABLE = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class JudgeRequest:
    messages: list[dict]
    schema: dict  # JSON schema the answer must follow (sent as response_format when structured)
    schema_name: str


@dataclass(frozen=True)
class JudgeReply:
    content: str | None  # the answer's text; None when every attempt failed
    error: str = ""
    cached: bool = False


@dataclass
class JudgeStats:
    requests: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    failed: int = 0  # judge calls that had no answer after all retries (or over budget)
    cache_hits: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"requests": self.requests, "retries": self.retries, "failed": self.failed,
                    "cache_hits": self.cache_hits}


class ResponseCache:
    """One file per answer, written to a temporary name and renamed: an interrupted write leaves no entry."""

    def __init__(self, directory: Path):
        self.directory = directory

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))["content"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None

    def put(self, key: str, content: str) -> None:
        write_json_atomic(self._path(key), {"content": content})


DELTA_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?")  # RFC 9110 has whole seconds; a fraction is tolerated


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds a `Retry-After` header asks to wait: delta-seconds or an HTTP date (a past date is 0). None when it
    is absent or neither form (e.g. "soon"): the caller then backs off as if there were none. Not capped here."""
    if value is None:
        return None
    value = value.strip()
    if DELTA_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, with no zone given
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class JudgeClient:
    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", temperature: float = 0.0,
                 max_tokens: int = 256, max_concurrency: int = 8, timeout_s: float = 30.0, retries: int = 4,
                 budget: int = 10_000, structured: bool = True, cache_dir: Path | None = None,
                 max_wait_s: float = 30.0, sleep: Callable[[float], None] = time.sleep, server_identity: str = ""):
        self.base_url = base_url.rstrip("/")
        # what cached answers are keyed by besides the request: the base URL, unless the caller names the server
        # otherwise (the harness's own local judge server gets a new port every run, but serves the same model)
        self.server_identity = server_identity or self.base_url
        self.model = model
        self.api_key_env = api_key_env
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_concurrency = max_concurrency
        self.retries = retries
        self.budget = budget
        self.max_wait_s = max_wait_s  # the longest wait between two tries, whatever Retry-After asks
        self.structured = structured
        # Greedy answers only: an answer sampled at temperature > 0 is one draw of the judge's verdict, and replaying
        # it would make every later evaluation repeat that draw (a seed or sample index in the key would too, across
        # steps and runs) instead of sampling afresh as asked.
        self.cache = ResponseCache(cache_dir) if cache_dir and temperature == 0 else None
        self.stats = JudgeStats()
        self._sleep = sleep
        self._http = httpx.Client(timeout=timeout_s, limits=httpx.Limits(max_connections=max_concurrency))

    def _cache_key(self, request: JudgeRequest) -> str:
        # the server too: another server may serve another model (or another version of it) under the same name
        payload = {"server": self.server_identity, "model": self.model, "messages": request.messages,
                   "schema": request.schema, "max_tokens": self.max_tokens, "structured": self.structured}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def _body(self, request: JudgeRequest) -> dict:
        body = {"model": self.model, "messages": request.messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens}
        if self.structured:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": request.schema_name, "schema": request.schema, "strict": True}}
        return body

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def complete(self, request: JudgeRequest) -> JudgeReply:
        key = self._cache_key(request)
        if self.cache and (hit := self.cache.get(key)) is not None:
            self.stats.add(cache_hits=1)
            return JudgeReply(hit, cached=True)
        error = ""
        for attempt in range(self.retries + 1):
            with self.stats._lock:
                if self.stats.requests >= self.budget:
                    error = f"request budget of {self.budget} spent"
                    break
                self.stats.requests += 1
            if attempt:
                self.stats.add(retries=1)
            wait = min(0.5 * 2**attempt, 8.0)
            try:
                response = self._http.post(f"{self.base_url}/chat/completions", json=self._body(request),
                                           headers=self._headers())
            except httpx.TimeoutException:
                error = "timed out"
            except httpx.TransportError as e:
                error = f"connection failed: {type(e).__name__}"
            else:
                if response.status_code == 200:
                    try:
                        content = response.json()["choices"][0]["message"]["content"]
                    except (ValueError, KeyError, IndexError, TypeError):
                        error = "response is not an OpenAI chat completion"
                        break  # the server answered; asking again would get the same
                    if self.cache and content is not None:
                        self.cache.put(key, content)
                    return JudgeReply(content)
                error = f"HTTP {response.status_code}"
                if response.status_code not in RETRYABLE:
                    break
                asked = retry_after_s(response.headers.get("retry-after"))
                wait = asked if asked is not None else wait
            if attempt < self.retries:
                self._sleep(max(0.0, min(wait, self.max_wait_s)))
        self.stats.add(failed=1)
        return JudgeReply(None, error)

    def complete_many(self, requests: list[JudgeRequest]) -> list[JudgeReply]:
        with ThreadPoolExecutor(self.max_concurrency) as pool:
            return list(pool.map(self.complete, requests))

    def close(self) -> None:
        self._http.close()
