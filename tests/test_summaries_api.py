"""Summaries and JSON mode through the real server: ``/v1/summarize``, the built-in ``summaries``
workload over ``/v1/chat/completions``, and ``response_format`` enforced with a grammar."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import CHAT_MODEL, ServerProc

NOTES = Path(__file__).resolve().parent.parent / "models" / "data" / "summaries" / "notes"
NOTE = (NOTES / "cardiology_medium.txt").read_text()
LONG = (NOTES / "discharge_long.txt").read_text()
LETTER = (NOTES / "clinic_letter_short.txt").read_text()  # about 12,900 tokens: three times the local context


def summarize(server: ServerProc, body: dict, **kw: object) -> httpx.Response:
    return httpx.post(server.url + "/v1/summarize", json=body, timeout=300, **kw)  # type: ignore[arg-type]


def test_extractive_sentences_are_verbatim_spans_of_the_source(server: ServerProc) -> None:
    r = summarize(server, {"input": NOTE, "max_words": 80})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["method"] == "extractive" and body["unsupported_dropped"] == 0 and body["model"] == "minilm-l6-v2"
    assert 0 < len(body["summary"].split()) <= 80
    for s in body["sentences"]:
        start, end = s["source_span"]
        assert NOTE[start:end] == s["text"]
    assert body["summary"] == " ".join(s["text"] for s in body["sentences"])
    assert [s["source_span"][0] for s in body["sentences"]] == sorted(s["source_span"][0] for s in body["sentences"])
    assert body["understudy"]["route"] == "local" and r.headers["x-understudy-workload"] == "summaries"


def test_a_note_far_past_the_local_context_gets_a_summary_over_chat(server: ServerProc) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    reply = client.chat.completions.create(model="summaries", messages=[{"role": "user", "content": LONG}])
    text = reply.choices[0].message.content or ""
    assert text and reply.choices[0].finish_reason == "stop"
    same = summarize(server, {"input": LONG}).json()  # the workload's own method and length
    assert text == same["summary"] and all(LONG[a:b] == s["text"] for s in same["sentences"] for a, b in [s["source_span"]])
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="summaries", messages=[{"role": "user", "content": LONG}], stream=True) if c.choices)
    assert streamed == text


def test_summarize_streams_sentence_by_sentence(server: ServerProc) -> None:
    with httpx.stream("POST", server.url + "/v1/summarize", json={"input": NOTE, "max_words": 60, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    sentences = [e for e in events if e["object"] == "summary.sentence"]
    final = events[-1]
    assert final["object"] == "summary" and [s["text"] for s in sentences] == [s["text"] for s in final["sentences"]]
    assert all(NOTE[s["source_span"][0]:s["source_span"][1]] == s["text"] for s in sentences)


def test_abstractive_map_reduce_over_a_note_longer_than_the_context(start_server) -> None:  # type: ignore[no-untyped-def]
    # 8 slots x 512 cells: the chat model takes 512 tokens per request, and this letter is ~1,200.
    config = f"""
[models.{CHAT_MODEL}]
kv_tokens = 4096

[[workloads]]
name = "notes"
fallback = "local"
local_model = "{CHAT_MODEL}"
summary_method = "abstractive"
max_words = 40
"""
    with start_server(config) as srv:
        r = summarize(srv, {"input": LETTER, "method": "abstractive", "max_words": 40})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["method"] == "abstractive" and body["parts"] >= 2 and body["model"] == CHAT_MODEL
        assert body["usage"]["completion_tokens"] > 0
        for s in body["sentences"]:  # every kept sentence points at the source sentence that supports it
            start, end = s["source_span"]
            assert 0 <= start < end <= len(LETTER)
        # Over the workload, streamed sentence by sentence (each sent once it has been checked).
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused")
        with client.chat.completions.with_streaming_response.create(
                model="notes", stream=True, messages=[{"role": "user", "content": LETTER}]) as raw:
            assert raw.headers["x-understudy-route"] == "local"
            chunks = [c for c in raw.parse() if c.choices]
        assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body,param,text", [
    ({"input": "   "}, "input", "input is empty"),
    ({"input": "x", "max_words": 0}, "max_words", "greater than or equal to 1"),
    ({"input": "x", "method": "poetic"}, "method", "'extractive' or 'abstractive'"),
    ({}, "input", "Missing required parameter"),
    ({"input": "x", "model": "no-such-model"}, "model", "does not exist"),
])
def test_bad_summary_requests_are_clear_400s(server: ServerProc, body: dict, param: str, text: str) -> None:
    r = summarize(server, body)
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert err["param"] == param and text in err["message"], err


# -- JSON mode ---------------------------------------------------------------------------------------
def test_json_mode_always_parses_with_sampling_on(server: ServerProc) -> None:
    async def run() -> list[dict]:
        sem = asyncio.Semaphore(12)
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as c:
            async def one(i: int) -> dict:
                async with sem:
                    r = await c.post("/v1/chat/completions", json={
                        "model": CHAT_MODEL, "max_tokens": 40, "temperature": 1.0, "seed": i,
                        "response_format": {"type": "json_object"},
                        "messages": [{"role": "user", "content": "Describe a hospital patient as a JSON object."}]})
                    assert r.status_code == 200, r.text
                    return r.json()["choices"][0]
            return await asyncio.gather(*[one(i) for i in range(100)])

    choices = asyncio.run(run())
    for choice in choices:  # even an answer cut by max_tokens is closed so that it parses
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    assert {c["finish_reason"] for c in choices} <= {"stop", "length"}


def test_a_json_schema_is_honoured(server: ServerProc) -> None:
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},  # llama-cpp-python's converter ignores minimum/maximum (README)
        "urgency": {"type": "string", "enum": ["emergent", "urgent", "routine"]}},
        "required": ["name", "age", "urgency"], "additionalProperties": False}
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    for seed in range(8):
        reply = client.chat.completions.create(
            model=CHAT_MODEL, seed=seed, temperature=1.0, max_tokens=80,
            messages=[{"role": "user", "content": "A patient arrives with chest pain."}],
            response_format={"type": "json_schema", "json_schema": {"name": "patient", "schema": schema}})
        data = json.loads(reply.choices[0].message.content or "")
        assert set(data) == {"name", "age", "urgency"}
        assert isinstance(data["name"], str) and len(data["name"]) <= 20
        assert isinstance(data["age"], int) and data["urgency"] in schema["properties"]["urgency"]["enum"]


@pytest.mark.parametrize("schema", [{"type": "foo"}, {"$ref": "#/definitions/missing"}])
def test_a_schema_the_grammar_converter_cannot_take_is_a_400(server: ServerProc, schema: dict) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "response_format.json_schema.schema" and "grammar" in err["message"]
