"""The batching core with the real models: prefix cache, admission control, ONNX dynamic batching."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import httpx
import openai

from tests.conftest import CHAT_MODEL, EMBED_MODEL, ServerProc

SYSTEM = "You are a careful assistant for hospital staff. Answer briefly and never invent facts. " * 3


def chat(url: str, content: str, max_tokens: int = 4, **extra: object) -> httpx.Response:
    body = {"model": CHAT_MODEL, "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


def test_prefix_cache_hit_is_reported_in_usage(server: ServerProc) -> None:
    first = chat(server.url, "What is a normal resting heart rate?").json()["usage"]
    again = chat(server.url, "What is a normal resting heart rate?").json()["usage"]
    assert again["prompt_tokens"] == first["prompt_tokens"]
    assert again["prompt_tokens_details"]["cached_tokens"] == again["prompt_tokens"] - 1
    # a different question that shares the long system prompt reuses at least that prefix
    other = chat(server.url, "And a normal breathing rate?").json()["usage"]
    assert 40 <= other["prompt_tokens_details"]["cached_tokens"] < other["prompt_tokens"] - 5


def _hold_slot(url: str, stop: threading.Event, started: threading.Event) -> None:
    # Greedy: SmolLM2 writes this story to the 2000-token limit (sampled, it may stop early and free the slot).
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 2000, "stream": True,
            "temperature": 0}
    with httpx.Client(timeout=120) as c, c.stream("POST", url + "/v1/chat/completions", json=body) as r:
        for _ in r.iter_lines():
            started.set()
            if stop.is_set():
                break


def test_queue_full_is_429_with_retry_after_and_timeout_is_503(start_server) -> None:  # type: ignore[no-untyped-def]
    config = f"""
[models.{CHAT_MODEL}]
slots = 1
max_waiting = 2
queue_timeout_s = 1.5
"""
    with start_server(config) as srv:
        stop, started = threading.Event(), threading.Event()
        holder = threading.Thread(target=_hold_slot, args=(srv.url, stop, started))
        holder.start()
        try:
            assert started.wait(30)
            results: list[httpx.Response] = []
            waiters = [threading.Thread(target=lambda: results.append(chat(srv.url, "hi"))) for _ in range(2)]
            for w in waiters:
                w.start()
            deadline = time.monotonic() + 5
            while srv.status()["models"][CHAT_MODEL]["engine"]["waiting"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            t0 = time.monotonic()
            refused = chat(srv.url, "one too many")
            assert time.monotonic() - t0 < 0.5  # immediately, not after waiting
            assert refused.status_code == 429
            err = refused.json()["error"]
            assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error"
            assert int(refused.headers["retry-after"]) >= 1
            for w in waiters:
                w.join(30)
            assert [r.status_code for r in results] == [503, 503]
            assert all(r.json()["error"]["code"] == "queue_timeout" and "retry-after" in r.headers for r in results)
        finally:
            stop.set()
            holder.join(30)
        assert chat(srv.url, "and now?").status_code == 200


def test_a_burst_gets_answers_or_429s_and_nothing_else(start_server) -> None:  # type: ignore[no-untyped-def]
    config = f"""
[models.{CHAT_MODEL}]
slots = 2
max_waiting = 6
"""
    with start_server(config) as srv:
        async def burst() -> list[tuple[int, bool, str]]:
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as c:
                async def one(i: int) -> tuple[int, bool, str]:
                    r = await c.post(srv.url + "/v1/chat/completions", json={
                        "model": CHAT_MODEL, "messages": [{"role": "user", "content": f"Count to {i}"}], "max_tokens": 8, "temperature": 0})
                    body = r.json()
                    ok = r.status_code == 200 and bool(body["choices"][0]["message"]["content"])
                    return r.status_code, ok or "retry-after" in r.headers, body.get("error", {}).get("code", "")
                return await asyncio.gather(*[one(i) for i in range(60)])

        outcomes = asyncio.run(burst())
        statuses = {s for s, _, _ in outcomes}
        assert statuses <= {200, 429}, statuses
        assert all(proper for _, proper, _ in outcomes)
        assert sum(1 for s, _, _ in outcomes if s == 200) >= 6  # at least the queue's worth
        assert sum(1 for s, _, _ in outcomes if s == 429) >= 1
        engine = srv.status()["models"][CHAT_MODEL]["engine"]
        assert engine["running"] == 0 and engine["waiting"] == 0


def test_onnx_batches_form_under_load_and_match_unbatched_vectors(server: ServerProc) -> None:
    texts = [f"Patient {i}: {'fever and cough' if i % 2 else 'knee pain after a fall'}, day {i % 7}." for i in range(48)]
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        alone = [client.embeddings.create(model=EMBED_MODEL, input=t).data[0].embedding for t in texts]
        listed = [d.embedding for d in client.embeddings.create(model=EMBED_MODEL, input=texts).data]
    before = httpx.get(server.url + "/admin/status").json()["models"][EMBED_MODEL]["engine"]

    async def together() -> list[list[float]]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        try:
            replies = await asyncio.gather(*[client.embeddings.create(model=EMBED_MODEL, input=t) for t in texts])
        finally:
            await client.close()
        return [r.data[0].embedding for r in replies]

    concurrent = asyncio.run(together())
    after = httpx.get(server.url + "/admin/status").json()["models"][EMBED_MODEL]["engine"]
    batches = after["batches"] - before["batches"]
    assert batches < len(texts), "48 concurrent requests were not batched"
    assert after["max_batch"] > 1

    def close(a: list[float], b: list[float]) -> bool:
        return max(abs(x - y) for x, y in zip(a, b)) < 1e-4 and math.isclose(sum(x * y for x, y in zip(a, b)), 1.0, abs_tol=1e-4)

    assert all(close(a, b) for a, b in zip(alone, concurrent))
    assert all(close(a, b) for a, b in zip(alone, listed))
