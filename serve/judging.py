"""Sampled judging of live traffic: a deterministic sample of each version's requests, stored with their adapter and
version and judged in batches, off the request path, by any OpenAI-compatible endpoint.

- Which requests: `sampled` hashes the request's content (its prompt, or its messages) into [0, 1) and keeps it
  below serve.judge.sample_rate (serve.judge.rates per adapter). The same request gets the same decision on every
  ingress replica, and every version of an adapter is sampled on the same prompts, so a canary's two versions are
  judged on comparable questions. Requests with `x-loraforge-judge: off` (JUDGE_HEADER) are never sampled: the opt-out
  for sensitive traffic; the judge's own requests carry it too. Token-id prompts and list prompts are not sampled
  (there is no text to show a judge); with n > 1 the first choice is judged.
- Where they go: the ingress (`Sampler`) sends each sampled prompt and its answer, batched every FLUSH_S, to
  `JudgeWorker`, a one-replica Serve deployment of the app: the one writer of the store (`JudgeStore`,
  <serve.judge.store>/judged.jsonl, at most max_rows rows and max_age_h hours) and the one client of the judge.
- How they are judged: every serve.judge.interval_s, up to batch_size samples, with the evaluation stage's judge
  prompt and score parsing (pipelines.artifacts.judge, which pipelines.eval.judge uses too: judge_prompt without a
  reference answer, ask_judge); the judge is serve.judge.url (default: this app's own base model over loopback, with
  serve.api_key and its reply constrained to 1..10 (serve.judge.constrain); else the key in the env var
  serve.judge.api_key_env, never logged). Each row is stored with its score (or why it has none) and counted in
  serve.metrics.JudgeMetrics per adapter and version; scored rows of canaried adapters go to the canary controller.

Pure apart from `JudgeWorker` (and `Sampler`'s sends), which need Ray.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.artifacts.judge import ask_judge, judge_prompt
from serve.config import ServeConfig
from serve.metrics import JudgeMetrics
from serve.routing import bucket

JUDGE_HEADER = "x-loraforge-judge"  # "off" (or 0 / false / no): this request is never sampled for judging
OFF = {"off", "0", "false", "no"}
FLUSH_S = 0.5  # how long an ingress replica gathers samples before sending them to the judge replica
REPLY_CHARS = 200  # how much of the judge's reply a stored row keeps
logger = logging.getLogger("loraforge.serve")


def opted_out(headers: Any) -> bool:
    """The request asked not to be sampled (`x-loraforge-judge: off`)."""
    value = headers.get(JUDGE_HEADER) if headers is not None else None
    return value is not None and value.strip().lower() in OFF


def sampled(key: str, rate: float) -> bool:
    """Whether content `key` is in the sample of `rate`: its hash, uniform in [0, 1), below the rate."""
    return rate >= 1 or (rate > 0 and bucket("judge", key) < rate)


def _text(content: Any) -> str | None:
    """A message's content as text: a string, or the text parts of a list of parts (None when it has others)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    return None


def request_text(body: Any) -> tuple[str, str] | None:
    """(hash key, question for the judge) of an OpenAI request (vLLM's request models, or dicts): a chat's
    messages (one user message: its text; more: `role: text` lines), a completion's prompt string. None when it
    cannot be judged as text (token ids, several prompts, images or audio)."""
    get = body.get if isinstance(body, dict) else lambda k, d=None: getattr(body, k, d)
    messages = get("messages")
    if messages is not None:
        turns = []
        for m in messages:
            m = m if isinstance(m, dict) else getattr(m, "model_dump", lambda: dict(m))()
            text = _text(m.get("content"))
            if text is None:
                return None
            turns.append((str(m.get("role", "")), text))
        if not turns:
            return None
        key = json.dumps({"messages": turns}, ensure_ascii=False, separators=(",", ":"))
        question = turns[0][1] if len(turns) == 1 and turns[0][0] == "user" else \
            "\n".join(f"{role}: {text}" for role, text in turns)
        return key, question
    prompt = get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        return None
    return json.dumps({"prompt": prompt}, ensure_ascii=False, separators=(",", ":")), prompt


def answer_text(content: dict[str, Any]) -> str | None:
    """The first choice's text of a whole OpenAI response (completion or chat)."""
    choices = content.get("choices") or []
    if not choices:
        return None
    first = choices[0]
    if "message" in first:
        return (first.get("message") or {}).get("content") or ""
    return first.get("text") or ""


class Sampler:
    """An ingress replica's side: decides which requests are sampled and sends each sampled prompt with its answer
    to the judge replica (`handle`), batched every `flush_s`. Sending never blocks or fails a request."""

    def __init__(self, cfg: ServeConfig, handle: Any, flush_s: float = FLUSH_S):
        self.cfg, self.handle, self.flush_s = cfg, handle, flush_s
        self.buffer: list[dict[str, Any]] = []
        self._task: Any = None

    def sample(self, body: Any, adapter: str, version: str, headers: Any) -> dict[str, Any] | None:
        """A pending row when this request is in the sample (adapter "" for the base model), else None."""
        rate = self.cfg.judge.rate(adapter or None, self.cfg.model_alias)
        if rate <= 0 or opted_out(headers):
            return None
        try:
            got = request_text(body)
        except Exception:  # noqa: BLE001 - a request shape not foreseen here is not sampled; it is still served
            return None
        if got is None or not sampled(got[0], rate):
            return None
        return {"ts": time.time(), "adapter": adapter, "version": version, "question": got[1]}

    def answered(self, row: dict[str, Any], answer: str | None) -> None:
        if answer is None:
            return
        self.buffer.append({**row, "answer": answer})
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        await asyncio.sleep(self.flush_s)
        batch, self.buffer = self.buffer, []
        try:
            await self.handle.offer.remote(batch)
        except Exception as e:  # noqa: BLE001 - these samples are lost; serving goes on
            logger.warning("loraforge: %d samples not sent to the judge replica (%s)", len(batch), type(e).__name__)


class JudgeStore:
    """Judged rows as JSON lines in <folder>/judged.jsonl, appended; once the file holds more than max_rows (plus a
    tenth, so it is not rewritten on every batch) or a row older than max_age_h, it is rewritten with the newest
    max_rows rows younger than max_age_h. One writer: the judge replica."""

    FILE = "judged.jsonl"

    def __init__(self, folder: str | Path, max_rows: int, max_age_h: float | None,
                 clock: Callable[[], float] = time.time):
        self.path = Path(folder) / self.FILE
        self.max_rows, self.max_age_s, self.clock = max_rows, None if max_age_h is None else max_age_h * 3600, clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        self._count, self._oldest = len(rows), min((r.get("ts", 0.0) for r in rows), default=None)

    def rows(self) -> list[dict[str, Any]]:
        """Every stored row, oldest first (a line that is not JSON, e.g. cut by a crash, is skipped)."""
        if not self.path.exists():
            return []
        out = []
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def append(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self._count += len(rows)
        first = min(r["ts"] for r in rows)
        self._oldest = first if self._oldest is None else min(self._oldest, first)
        if self._count > self.max_rows + self.max_rows // 10 or self._expired(self._oldest):
            self.compact()

    def _expired(self, ts: float | None) -> bool:
        return ts is not None and self.max_age_s is not None and ts < self.clock() - self.max_age_s

    def compact(self) -> None:
        keep = [r for r in self.rows() if not self._expired(r.get("ts", 0.0))][-self.max_rows:]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, self.path)
        self._count, self._oldest = len(keep), min((r.get("ts", 0.0) for r in keep), default=None)


def loopback_url(cfg: ServeConfig) -> str:
    """This app's own OpenAI base URL as the judge replica reaches it (the HTTP proxy on its node)."""
    host = cfg.host if cfg.host not in ("0.0.0.0", "::", "localhost") else "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{cfg.port}/v1"


class JudgeWorker:
    """The Serve deployment (one replica) that stores and judges the samples every ingress replica sends
    (`offer`), exports the scores (serve.metrics.JudgeMetrics) and sends canaried adapters' scores to the canary
    controller; `status` for tests and operators."""

    async def __init__(self, cfg: ServeConfig, canary: Any = None):
        self.cfg, self.j, self.canary = cfg, cfg.judge, canary
        self.store = JudgeStore(self.j.store, self.j.max_rows, self.j.max_age_h)
        self.url = self.j.url or loopback_url(cfg)
        self.model = self.j.model or cfg.model_alias
        self.constrained = self.j.constrain if self.j.constrain is not None else self.j.url is None
        self.queue: deque[dict[str, Any]] = deque()
        self.counts: Counter[tuple[str, str, str]] = Counter()  # (adapter, version, outcome)
        self.metrics = JudgeMetrics.create()
        self._client: Any = None
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def client(self) -> Any:
        if self._client is None:
            import openai

            key = self.cfg.api_key if self.j.url is None else os.environ.get(self.j.api_key_env)
            self._client = openai.OpenAI(base_url=self.url, api_key=key or "unused", max_retries=1,
                                         timeout=self.j.timeout_s, default_headers={JUDGE_HEADER: "off"})
        return self._client

    async def offer(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            tags = {"adapter": row["adapter"], "version": row["version"]}
            self.metrics.sampled.inc(1, tags=tags)
            if len(self.queue) >= self.j.max_queue:
                self._count(row, "dropped")
            else:
                self.queue.append(row)

    async def status(self) -> dict[str, Any]:
        return {"queued": len(self.queue), "store": str(self.store.path), "url": self.url, "model": self.model,
                "counts": [{"adapter": a, "version": v, "outcome": o, "n": n} for (a, v, o), n in self.counts.items()]}

    def _count(self, row: dict[str, Any], outcome: str, score: float | None = None) -> None:
        self.counts[(row["adapter"], row["version"], outcome)] += 1
        self.metrics.record(row["adapter"], row["version"], outcome, score)

    def judge_one(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row with the judge's verdict: outcome scored / no_score (the reply held no 1-10 score) / error."""
        try:
            score, reply = ask_judge(self.client(), self.model,
                                     judge_prompt(self.j.rubric, row["question"], row["answer"]), self.constrained)
        except Exception as e:  # noqa: BLE001 - a failed call is counted and stored, never retried
            return {**row, "outcome": "error", "score": None, "error": type(e).__name__}
        return {**row, "outcome": "scored" if score is not None else "no_score", "score": score,
                "reply": reply[:REPLY_CHARS]}

    async def judge_batch(self) -> list[dict[str, Any]]:
        """Judge up to batch_size queued samples (the calls in threads, a few at a time), store and count them."""
        batch = [self.queue.popleft() for _ in range(min(self.j.batch_size, len(self.queue)))]
        if not batch:
            return []
        done = await asyncio.gather(*(asyncio.to_thread(self.judge_one, r) for r in batch))
        await asyncio.to_thread(self.store.append, done)
        for row in done:
            self._count(row, row["outcome"], row["score"])
        scored = [{"adapter": r["adapter"], "version": r["version"], "score": r["score"]} for r in done
                  if r["score"] is not None and r["adapter"] in self.cfg.canary]
        if scored and self.canary is not None:
            await self.canary.observe_judged.remote(scored)
        return done

    async def _loop(self) -> None:
        while True:
            try:
                await self.judge_batch()
            except Exception:  # noqa: BLE001 - a store or controller hiccup: the next batch tries again
                logger.exception("loraforge: judge batch failed")
            if len(self.queue) < self.j.batch_size:
                await asyncio.sleep(self.j.interval_s)
