"""The official ``openai`` client against a running Understudy: chat, completions, embeddings, models."""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterator

import openai
import pytest

from tests.conftest import CHAT_MODEL, EMBED_MODEL, ServerProc

STORY = [{"role": "user", "content": "Write a short story about a nurse named Anna who works nights."}]


@pytest.fixture(scope="module")
def client(server: ServerProc) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_chat_completion_non_streaming(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model=CHAT_MODEL, messages=STORY, max_tokens=24, temperature=0)
    assert raw.headers["x-understudy-route"] == "local"
    assert raw.headers["x-understudy-model"] == CHAT_MODEL
    resp = raw.parse()
    assert resp.model == CHAT_MODEL and resp.object == "chat.completion"
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = resp.usage
    assert u is not None and u.prompt_tokens > 10 and 0 < u.completion_tokens <= 24
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_streaming_chat_yields_the_same_text_as_non_streaming(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=CHAT_MODEL, messages=STORY, max_tokens=32, temperature=0)
    stream = client.chat.completions.create(
        model=CHAT_MODEL, messages=STORY, max_tokens=32, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    pieces, finish, usage, roles = [], None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert roles == ["assistant"]
    assert len(pieces) > 3
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_max_tokens_and_max_completion_tokens_cut_with_length(client: openai.OpenAI) -> None:
    a = client.chat.completions.create(model=CHAT_MODEL, messages=STORY, max_tokens=5, temperature=0)
    b = client.chat.completions.create(model=CHAT_MODEL, messages=STORY, max_completion_tokens=5, temperature=0)
    for r in (a, b):
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 5
    assert a.choices[0].message.content == b.choices[0].message.content


def test_stop_string_ends_the_answer_and_is_not_returned(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=CHAT_MODEL, messages=STORY, max_tokens=48, temperature=0).choices[0].message.content
    assert full and len(full) > 40
    stop = full[20:26]  # six characters from the middle: usually spans a token boundary
    cut = full[: full.index(stop)]
    r = client.chat.completions.create(model=CHAT_MODEL, messages=STORY, max_tokens=48, temperature=0, stop=[stop, "\u2603never"])
    assert r.choices[0].message.content == cut
    assert r.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=CHAT_MODEL, messages=STORY, max_tokens=48, temperature=0, stop=stop, stream=True)
    text, finish = "", None
    for chunk in streamed:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == cut and finish == "stop"
    assert stop not in text


def test_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    def run(seed: int) -> str:
        r = client.chat.completions.create(model=CHAT_MODEL, messages=STORY, max_tokens=24, temperature=1.0, top_p=0.95, seed=seed)
        return r.choices[0].message.content or ""

    assert run(1234) == run(1234)
    assert len({run(s) for s in (1, 2, 3)}) > 1


def test_completions_streaming_and_not(client: openai.OpenAI) -> None:
    r = client.completions.create(model=CHAT_MODEL, prompt="The three primary colours are", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    assert r.usage.completion_tokens <= 12
    text = ""
    for chunk in client.completions.create(model=CHAT_MODEL, prompt="The three primary colours are", max_tokens=12, temperature=0, stream=True):
        text += chunk.choices[0].text if chunk.choices else ""
    assert text == r.choices[0].text


def test_completions_default_to_sixteen_tokens_like_openai(client: openai.OpenAI) -> None:
    r = client.completions.create(model=CHAT_MODEL, prompt="Once upon a time, in a village by the sea,", temperature=0)
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def _norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / (_norm(a) * _norm(b))


def test_embeddings_one_and_many(client: openai.OpenAI) -> None:
    one = client.embeddings.create(model=EMBED_MODEL, input="The patient has a fever.")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 384
    assert abs(_norm(one.data[0].embedding) - 1.0) < 1e-4
    assert one.usage.prompt_tokens > 2
    texts = ["The patient has a fever.", "The patient's temperature is high.", "Stock markets fell sharply today."]
    many = client.embeddings.create(model=EMBED_MODEL, input=texts)
    assert [d.index for d in many.data] == [0, 1, 2]
    v = [d.embedding for d in many.data]
    assert _cos(v[0], v[1]) > _cos(v[0], v[2]) + 0.2
    assert max(abs(a - b) for a, b in zip(v[0], one.data[0].embedding)) < 1e-4


def test_embeddings_base64_is_the_same_vector(client: openai.OpenAI, server: ServerProc) -> None:
    import httpx

    floats = client.embeddings.create(model=EMBED_MODEL, input=["ward round notes"], encoding_format="float").data[0].embedding
    raw = httpx.post(server.url + "/v1/embeddings", json={"model": EMBED_MODEL, "input": "ward round notes", "encoding_format": "base64"}).json()
    b64 = raw["data"][0]["embedding"]
    assert isinstance(b64, str)
    decoded = struct.unpack(f"<{len(floats)}f", base64.b64decode(b64))
    assert max(abs(a - b) for a, b in zip(decoded, floats)) < 1e-6
    # the openai client asks for base64 by default and decodes it itself
    auto = client.embeddings.create(model=EMBED_MODEL, input="ward round notes").data[0].embedding
    assert max(abs(a - b) for a, b in zip(auto, floats)) < 1e-6


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {CHAT_MODEL, EMBED_MODEL} <= ids
    m = client.models.retrieve(CHAT_MODEL)
    assert m.id == CHAT_MODEL and m.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
