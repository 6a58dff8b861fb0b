"""Triage through the real server: the embedded ``triage-minilm`` classifier (trained from the
shipped examples over MiniLM) answering ``/v1/triage`` and the ``triage`` workload over
``/v1/chat/completions``, real HTTP on loopback."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from models.catalog import TRIAGE_DATA, TRIAGE_LABELS
from tests.conftest import CHAT_MODEL, ROOT, ServerProc

sys.path.insert(0, str(ROOT / "scripts"))
from eval_workloads import evaluate_triage  # noqa: E402

TRIAGE = "triage-minilm"


def triage(server: ServerProc, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/triage", json=body, timeout=60)


def test_triage_labels_messages_and_says_it_is_local(server: ServerProc) -> None:
    r = triage(server, {"input": ["I have crushing chest pain going down my left arm and I'm sweating",
                                  "Can I move my Tuesday appointment to Friday afternoon?",
                                  "could I get a refill of my lisinopril please, running low next week"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == TRIAGE
    assert [d["label"] for d in body["data"]] == ["emergent", "administrative", "routine"]
    first = body["data"][0]
    assert set(first) >= {"index", "label", "confidence", "scores", "abstained", "red_flags"}
    assert set(first["scores"]) == set(TRIAGE_LABELS) and abs(sum(first["scores"].values()) - 1) < 1e-3
    assert "chest pain" in first["red_flags"]
    assert body["understudy"] == {"route": "local", "model": TRIAGE, "reason": None}
    assert r.headers["x-understudy-route"] == "local" and r.headers["x-understudy-workload"] == "triage"
    assert body["usage"]["prompt_tokens"] > 0


def test_the_held_out_split_meets_the_targets(server: ServerProc) -> None:
    m = evaluate_triage(server.url, TRIAGE, TRIAGE_DATA / "examples.jsonl", list(TRIAGE_LABELS))
    assert m["messages"] >= 150
    assert m["macro_f1"] >= 0.90, m
    assert m["per_class"]["emergent"]["recall"] >= 0.97, m
    assert m["abstention_rate"] <= 0.10, m


def test_negation_and_other_languages(server: ServerProc) -> None:
    data = triage(server, {"input": [
        "no chest pain, no shortness of breath, just want my inhaler refilled",
        "Mi padre tiene un dolor muy fuerte en el pecho y no puede respirar bien",
        "asdkjh qwpoeiru zxcmvn lkjhg",
    ]}).json()["data"]
    assert data[0]["label"] == "routine" and data[0]["red_flags"] == []
    assert data[1]["abstained"] and data[1]["label"] == "needs_human_review" and data[1]["reason"] == "unsupported_language:es"
    assert data[2]["abstained"] and data[2]["label"] == "needs_human_review"


def test_a_long_message_is_chunked_never_refused(server: ServerProc) -> None:
    story = ("We went to the farmers market on Saturday and bought tomatoes, then visited my sister who lives "
             "near the lake, and we talked for a long time about her garden and the new puppy. ") * 25
    text = story + "Anyway the reason I am writing: since an hour ago I cannot feel my left side and my words come out wrong."
    r = triage(server, {"input": text})
    assert r.status_code == 200, r.text
    d = r.json()["data"][0]
    assert d["chunks"] > 1 and d["label"] == "emergent"


def test_chat_answers_follow_the_template_streamed_or_not(server: ServerProc) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    msg = [{"role": "system", "content": "ignored by a classifier"},
           {"role": "user", "content": "my dad's face is drooping and he can't lift his right arm"}]
    r = client.chat.completions.with_raw_response.create(model="triage", messages=msg)
    reply = r.parse()
    parsed = json.loads(reply.choices[0].message.content)
    assert parsed["label"] == "emergent" and 0 <= parsed["confidence"] <= 1
    assert r.headers["x-understudy-route"] == "local" and reply.model == TRIAGE
    assert reply.model_extra["understudy"]["route"] == "local"
    content = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="triage", messages=[{"role": "user", "content": "I need a copy of my immunisation records for school"}],
        stream=True) if c.choices)
    assert json.loads(content)["label"] == "administrative"
    # The provenance marker rides on the stream's last chunk.
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30, json={
            "model": "triage", "stream": True, "messages": [{"role": "user", "content": "rash on my arm for a week, no fever"}]}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert events[-1]["understudy"]["model"] == TRIAGE and events[-1]["choices"][0]["finish_reason"] == "stop"


def test_the_journal_keeps_provenance_without_text(server: ServerProc) -> None:
    secret = "Patient Zebulon Quarrington has chest pain"
    r = triage(server, {"input": secret})
    rid = r.headers["x-request-id"]
    settings = server.status()["models"][TRIAGE]["settings"]
    for _ in range(50):
        rows = [e for e in httpx.get(server.url + "/admin/events?limit=200").json()["data"] if e["request_id"] == rid]
        if rows:
            break
        time.sleep(0.05)
    prov = json.loads(rows[0]["provenance"])
    assert prov["head"] == settings["head_sha256"] and prov["examples"] == settings["examples_sha256"]
    assert prov["red_flags"] == settings["red_flags_sha256"] and prov["red_flag"] == 1
    journal = Path(server.config_path.parent / "state" / "journal.sqlite3").read_bytes()  # type: ignore[union-attr]
    assert b"Zebulon" not in journal and "Zebulon" not in server.log()


@pytest.mark.parametrize("body,param,text", [
    ({"input": ""}, "input", "empty"),
    ({"input": []}, "input", "empty list"),
    ({"input": ["fine", "  "]}, "input", "input[1] is empty"),
    ({"input": ["x"] * 257}, "input", "at most 256"),
    ({"input": "a" * 400_001}, "input", "at most 400000"),
    ({}, "input", "Missing required parameter"),
    ({"input": 5}, "input", "Invalid value"),
    ({"input": "x", "temperature": 0}, "temperature", "Unrecognized"),
    ({"input": "x", "model": "no-such-model"}, "model", "does not exist"),
    ({"input": "x", "model": CHAT_MODEL}, "model", "chat model"),
])
def test_bad_triage_input_is_a_clear_400(server: ServerProc, body: dict, param: str, text: str) -> None:
    r = triage(server, body)
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert err["param"] == param and text in err["message"]


def test_a_classifier_is_not_a_completion_or_embedding_model(server: ServerProc) -> None:
    r = httpx.post(server.url + "/v1/embeddings", json={"model": TRIAGE, "input": "x"})
    assert r.status_code == 400 and "/v1/triage" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "triage", "messages": [{"role": "assistant", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_training_is_cached_across_restarts(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = f'[server]\ncache_dir = "{tmp_path / "cache"}"\nstate_dir = "{tmp_path / "state"}"\n'
    with start_server(config) as srv:
        first = srv.status()["models"][TRIAGE]["settings"]
        assert first["trained_at_start"] is True and "trained on 600 examples" in srv.log()
    assert list((tmp_path / "cache" / "classifiers").glob("triage-minilm-*.npz"))
    with start_server(config) as srv:
        again = srv.status()["models"][TRIAGE]["settings"]
        assert again["trained_at_start"] is False and "head loaded from" in srv.log()
        assert again["head_sha256"] == first["head_sha256"]


def test_a_bad_examples_file_stops_the_server_with_exit_2(tmp_path: Path) -> None:
    examples = tmp_path / "ex.jsonl"
    examples.write_text("\n".join(json.dumps({"text": f"message {i}", "label": "routine"}) for i in range(20)) + "\n")
    config = tmp_path / "u.toml"
    config.write_text(f"""
[models.my-triage]
kind = "classifier"
embedding_model = "minilm-l6-v2"
examples = "{examples}"
examples_sha256 = "{'0' * 64}"
labels = ["urgent", "routine"]
red_flags = ["chest pain"]
""")
    out = subprocess.run([sys.executable, "-m", "server", "serve", "--config", str(config)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "models.my-triage.examples" in out.stderr and "1 label" in out.stderr


def test_priority_decides_who_gets_the_next_slot(start_server) -> None:  # type: ignore[no-untyped-def]
    config = f"""
[models.{CHAT_MODEL}]
slots = 1

[[workloads]]
name = "ward-urgent"
fallback = "local"
local_model = "{CHAT_MODEL}"
priority = "high"
"""

    async def run(url: str) -> list[str]:
        order: list[str] = []
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            async def ask(tag: str, model: str, max_tokens: int) -> None:
                r = await client.post("/v1/chat/completions", json={"model": model, "max_tokens": max_tokens, "temperature": 0,
                                                                     "messages": [{"role": "user", "content": "Write a very long story about a ship."}]})
                assert r.status_code == 200, r.text
                order.append(tag)
            hog = asyncio.create_task(ask("hog", CHAT_MODEL, 120))
            await asyncio.sleep(0.3)
            normal = [asyncio.create_task(ask(f"normal{i}", CHAT_MODEL, 24)) for i in range(3)]
            await asyncio.sleep(0.3)
            high = asyncio.create_task(ask("high", "ward-urgent", 4))
            await asyncio.gather(hog, high, *normal)
        return order

    with start_server(config) as srv:
        order = asyncio.run(run(srv.url))
    # Arrived last, served before the normal requests that were waiting (all but, at most, one
    # that the slot may have taken if the first request ended early).
    assert order.index("high") < order.index("normal1") and order.index("high") < order.index("normal2"), order
