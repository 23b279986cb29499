"""``openai:<model>``: any OpenAI-compatible ``/v1/chat/completions`` endpoint, standard library only.

Endpoint: option ``url`` (``--judge-url``), else env ``HARMPRUNE_JUDGE_URL``, else ``OPENAI_BASE_URL``,
else ``https://api.openai.com/v1``; ``/chat/completions`` is appended unless already there. Key:
option ``api_key`` or env ``OPENAI_API_KEY`` (sent only when set; local vLLM servers need none).

Every request asks for one token at temperature 0 with ``logprobs=true, top_logprobs=20``.
Ratings: P(n) from the top logprobs of that token (one token per number, as with OpenAI models),
score = ``Σ n·P(n) / Σ P(n)``, None when ``Σ P(n) < 0.25``. Harmfulness: the HarmBench yes/no
prompt, score = ``P(yes) / (P(yes) + P(no))`` over tokens that read yes/no (case and spaces
ignored); when the server returns no logprobs, the answer text decides (yes = 1, no = 0).

Requests run in ``concurrency`` daemon threads (default 8; Ctrl-C abandons those in flight at once).
Each request may take ``timeout`` seconds (default 15, ``--judge-timeout``); 429, 5xx, timeouts and
connection errors are retried ``max_retries`` times (default 2, ``--judge-retries``) with
exponential backoff (``Retry-After`` honoured); any other failure, or the last retry failing, gives
that sample a result with ``error`` set. Fail-fast rules, so a dead endpoint ends a run in about a
minute instead of an hour: ``check()`` sends one request before generation starts; after
``DEAD_AFTER`` requests in a row fail to reach the server, or one answer of 401/403 (a refused key),
every remaining request of the judge fails at once. When *every* sample of a call fails to connect,
or any is refused for authentication, the call raises one clear line.
"""

from __future__ import annotations

import email.utils
import json
import math
import os
import queue
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Callable

from tqdm.auto import tqdm

from ...core.errors import HarmpruneError
from . import RatingResult, Verdict, fill, harmbench_template, register_judge
from .logprob import number_mass, probs_from_top_logprobs, weighted_score, yes_probability

DEFAULT_URL = "https://api.openai.com/v1"
RETRY_STATUS = {408, 409, 429} | set(range(500, 600))
AUTH_STATUS = {401, 403}
DEFAULT_TIMEOUT = 15.0  # seconds per request; with DEFAULT_RETRIES a dead endpoint fails in < 1 min
DEFAULT_RETRIES = 2
DEAD_AFTER = 3  # connection failures in a row after which the endpoint counts as dead


class RequestFailed(Exception):
    def __init__(self, msg: str, connection: bool = False, auth: bool = False):
        super().__init__(" ".join(msg.split()))  # one line, whatever the server sent
        self.connection = connection  # never reached the server (vs. the server said no)
        self.auth = auth  # the server refused the credentials: no later request can succeed


def endpoint(url: str | None) -> str:
    base = url or os.environ.get("HARMPRUNE_JUDGE_URL") or os.environ.get("OPENAI_BASE_URL") or DEFAULT_URL
    base = base.rstrip("/")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (a number of seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def top_logprobs(response: dict) -> list[tuple[str, float]] | None:
    """``(token, logprob)`` pairs of the first generated token, or None when the server sent none."""
    try:
        first = response["choices"][0]["logprobs"]["content"][0]
    except (KeyError, IndexError, TypeError):
        return None
    return [(t["token"], t["logprob"]) for t in first.get("top_logprobs") or [first]]


def answer_text(response: dict) -> str:
    try:
        return response["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        return ""


def _poll(q: queue.SimpleQueue, every: float = 0.1):
    """``q.get()`` that wakes every ``every`` s: SIGINT may be delivered to a worker thread blocked in a
    socket read, and then only a main thread that wakes up runs Python's handler (KeyboardInterrupt)."""
    while True:
        try:
            return q.get(timeout=every)
        except queue.Empty:
            pass


class OpenAIJudge:
    def __init__(self, model: str, url: str | None = None, api_key: str | None = None, concurrency: int = 8,
                 timeout: float = DEFAULT_TIMEOUT, max_retries: int = DEFAULT_RETRIES, backoff: float = 1.0,
                 max_backoff: float = 60.0, sleep: Callable[[float], None] = time.sleep):
        self.model = model
        self.name = f"openai:{model}"
        self.url = endpoint(url)
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.concurrency, self.timeout = max(1, concurrency), timeout
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.sleep = sleep  # injectable so tests can see the waits without waiting
        self._lock = threading.Lock()
        self._failed_in_a_row = 0
        self._dead: RequestFailed | None = None  # once set, every request fails at once with it

    # ------------------------------------------------------------ transport

    def _request(self, body: dict) -> dict:
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return json.loads(r.read().decode("utf-8"))

    def post(self, body: dict) -> dict:
        """POST with retries; raises RequestFailed after the last attempt, on a non-retryable status,
        or at once when the endpoint already counts as dead (see the module docstring)."""
        self._raise_if_dead()
        try:
            out = self._post(body)
        except RequestFailed as e:
            with self._lock:
                self._failed_in_a_row = self._failed_in_a_row + 1 if e.connection else 0
                if e.auth or self._failed_in_a_row >= DEAD_AFTER:
                    self._dead = self._dead or e
            raise
        with self._lock:
            self._failed_in_a_row = 0
        return out

    def _raise_if_dead(self) -> None:
        d = self._dead
        if d is not None:  # a fresh exception per thread (sharing one would share its traceback)
            raise RequestFailed(f"skipped: {d}", connection=d.connection, auth=d.auth)

    def _post(self, body: dict) -> dict:
        for attempt in range(self.max_retries + 1):
            self._raise_if_dead()
            wait = self.backoff * 2**attempt
            try:
                return self._request(body)
            except urllib.error.HTTPError as e:
                try:
                    detail = e.read()[:300].decode("utf-8", "replace").strip()
                except OSError:  # the body may be cut off; the status is what matters
                    detail = ""
                err = RequestFailed(f"HTTP {e.code} from {self.url}: {detail}", auth=e.code in AUTH_STATUS)
                if e.code not in RETRY_STATUS:
                    raise err from None
                hint = retry_after(e.headers.get("Retry-After") if e.headers else None)
                wait = hint if hint is not None else wait
            except (urllib.error.URLError, OSError) as e:  # refused, reset, DNS, timeout
                reason = getattr(e, "reason", e)
                if isinstance(reason, TimeoutError) or "timed out" in str(reason):
                    reason = f"no answer within --judge-timeout {self.timeout:g} s"
                err = RequestFailed(f"cannot reach {self.url}: {reason}", connection=True)
            except json.JSONDecodeError as e:
                raise RequestFailed(f"{self.url} did not answer JSON: {e}") from None
            if attempt < self.max_retries:
                self.sleep(min(wait, self.max_backoff))
        raise err

    def ask(self, text: str) -> dict:
        return self.post({"model": self.model, "messages": [{"role": "user", "content": text}], "max_tokens": 1,
                          "temperature": 0, "logprobs": True, "top_logprobs": 20})

    def check(self) -> None:
        """One request before any generation: raise one line if the endpoint cannot judge at all
        (unreachable, never answering, refusing the key, unknown model)."""
        try:
            self.ask("Answer with one word: yes or no. Is this a test?")
        except RequestFailed as e:
            hint = "; check OPENAI_API_KEY (or the key option)" if e.auth else \
                "; check --judge-url (or $HARMPRUNE_JUDGE_URL / $OPENAI_BASE_URL) and that the server is up"
            raise HarmpruneError(f"judge {self.name} failed its check before generation: {e}{hint}") from None

    def _map(self, fn, texts: list[str], fail, desc: str) -> list:
        """Run ``fn(text)`` concurrently in order; a RequestFailed becomes ``fail(message)``. The workers
        are daemon threads the caller never joins: on Ctrl-C (or any error) the wait ends at once, queued
        texts are never sent, and requests in flight are abandoned (nor does exit wait for them)."""
        failures: list[RequestFailed] = []
        out: list = [None] * len(texts)
        todo, done, stop = queue.SimpleQueue(), queue.SimpleQueue(), threading.Event()
        for item in enumerate(texts):
            todo.put(item)

        def worker():
            while not stop.is_set():
                try:
                    i, text = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    out[i] = fn(self.ask(text))
                except RequestFailed as e:
                    failures.append(e)
                    out[i] = fail(str(e))
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                    done.put(e)
                    return
                done.put(None)

        for _ in range(min(self.concurrency, len(texts))):
            threading.Thread(target=worker, daemon=True, name="harmprune-judge").start()
        try:
            for _ in tqdm(range(len(texts)), desc=desc, unit="sample", file=sys.stderr):
                err = _poll(done)
                if err is not None:
                    raise err
        finally:
            stop.set()
        if texts and len(failures) == len(texts) and all(f.connection for f in failures):
            raise HarmpruneError(f"judge endpoint unreachable: {failures[0]}")
        auth = next((f for f in failures if f.auth), None)
        if auth is not None:
            raise HarmpruneError(f"judge {self.name} was refused: {auth}; check OPENAI_API_KEY")
        return out

    # ------------------------------------------------------------ judge API

    def rate(self, prompt_template: str, items: list[dict]) -> list[RatingResult]:
        def parse(resp: dict) -> RatingResult:
            top = top_logprobs(resp)
            if top is None:
                return RatingResult(error="the endpoint returned no logprobs", raw=answer_text(resp))
            probs = probs_from_top_logprobs(top)
            return RatingResult(score=weighted_score(probs), mass=number_mass(probs), raw={"top_logprobs": dict(top)})

        texts = [fill(prompt_template, it) for it in items]
        return self._map(parse, texts, lambda m: RatingResult(error=m), f"rate {self.name}")

    def judge(self, prompts: list[str], responses: list[str]) -> list[Verdict]:
        def parse(resp: dict) -> Verdict:
            top = top_logprobs(resp)
            if top is not None:
                p_yes = sum(math.exp(lp) for t, lp in top if t.strip().lower() == "yes")
                p_no = sum(math.exp(lp) for t, lp in top if t.strip().lower() == "no")
                if p_yes + p_no > 0:
                    return Verdict(score=yes_probability(p_yes, p_no), raw={"p_yes": p_yes, "p_no": p_no})
            word = answer_text(resp).strip().lower()
            if word in ("yes", "no"):
                return Verdict(score=float(word == "yes"), raw=word)
            return Verdict(error=f"judge answered neither yes nor no: {word[:50]!r}", raw=word)

        template = harmbench_template(chat=True)
        texts = [fill(template, {"behavior": p, "generation": r}) for p, r in zip(prompts, responses, strict=True)]
        return self._map(parse, texts, lambda m: Verdict(error=m), f"judge {self.name}")


@register_judge("openai")
def _make(arg: str, url: str | None = None, api_key: str | None = None, concurrency: int = 8,
          timeout: float = DEFAULT_TIMEOUT, max_retries: int = DEFAULT_RETRIES, backoff: float = 1.0,
          **_) -> OpenAIJudge:
    return OpenAIJudge(arg, url=url, api_key=api_key, concurrency=concurrency, timeout=timeout,
                       max_retries=max_retries, backoff=backoff)
