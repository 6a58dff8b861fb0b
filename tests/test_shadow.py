"""Shadow mode through the real server and a fake cloud whose answers are scripted (real HTTP both
ways): agreement, disagreement and unparseable cloud answers for triage, cosine and support for
summaries, skipped under load, readiness, and no text in the journal."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import FakeCloud, ServerProc, run_server


CHEST = "Crushing chest pain spreading to my jaw and I am sweating a lot."
RESCHEDULE = "Could I move my physiotherapy appointment from Tuesday to Thursday afternoon?"
PROSE = "My toddler has had a runny nose and a mild cough since yesterday."
NOTE = ("Discharge summary. The patient was admitted with community-acquired pneumonia. "
        "Chest X-ray showed right lower lobe consolidation. He was treated with intravenous antibiotics for three days. "
        "Oxygen was weaned on day two. He was discharged on oral amoxicillin for five more days. "
        "Follow-up with the general practitioner in one week is advised.")
CLOUD_SUMMARY = "Admitted with right lower lobe pneumonia, treated with antibiotics and discharged on oral amoxicillin."


def scripted(body: dict[str, Any]) -> str:
    text = json.dumps(body.get("messages"))
    if "Crushing chest pain" in text:
        return '{"label": "emergent", "confidence": 0.97}'  # the local classifier says emergent too
    if "physiotherapy appointment" in text:
        return '{"label": "emergent", "confidence": 0.6}'  # the local classifier says administrative
    if "toddler" in text:
        return "This sounds like a common cold; see a doctor if the fever rises."  # no JSON at all
    return CLOUD_SUMMARY


def config_for(cloud: FakeCloud) -> str:
    return f"""
[[upstreams]]
name = "cloud"
base_url = "{cloud.url}"

[[workloads]]
name = "triage"
models = ["triage-model"]
fallback = "local"
local_model = "triage-minilm"
cloud_system_prompt = "Answer with JSON only: {{\\"label\\": ..., \\"confidence\\": ...}}"
shadow_rate = 1.0

[[workloads]]
name = "summaries"
fallback = "local"
local_model = "minilm-l6-v2"
summary_method = "extractive"
max_words = 30
shadow_rate = 1.0
"""


@pytest.fixture(scope="module")
def cloud() -> Iterator[FakeCloud]:
    c = FakeCloud(script=scripted).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def srv(cloud: FakeCloud, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    with run_server(tmp_path_factory.mktemp("shadow"), config_for(cloud)) as s:
        yield s


def ask(server: ServerProc, model: str, text: str, stream: bool = False) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "stream": stream}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    r.read()
    return r


def readiness(server: ServerProc) -> dict[str, Any]:
    return httpx.get(server.url + "/admin/readiness").json()["workloads"]


def wait_counts(server: ServerProc, workload: str, total: int, timeout: float = 20.0) -> dict[str, Any]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        w = readiness(server)[workload]
        if sum(w["counts"].values()) >= total:
            return w
        time.sleep(0.1)
    raise AssertionError(f"shadow samples did not arrive: {readiness(server)}")


def test_triage_shadow_counts_agreement_disagreement_and_unparseable_cloud_answers(srv: ServerProc) -> None:
    for text, stream in ((CHEST, False), (RESCHEDULE, True), (PROSE, False)):
        r = ask(srv, "triage-model", text, stream)
        assert r.status_code == 200 and r.headers["x-understudy-route"] == "cloud"  # the cloud answered, undelayed
    w = wait_counts(srv, "triage", 3)
    assert w["counts"] == {"agree": 1, "disagree": 1, "unparseable": 1}
    assert w["samples"] == 2 and w["readiness"] == 0.5
    assert w["confusion"]["emergent"] == {"emergent": 1, "administrative": 1}


def test_summaries_shadow_reports_cosine_and_support(srv: ServerProc) -> None:
    r = ask(srv, "summaries", f"Summarise this note:\n\n{NOTE}", stream=True)
    assert r.status_code == 200 and r.headers["x-understudy-route"] == "cloud"
    w = wait_counts(srv, "summaries", 1)
    assert w["counts"] == {"compared": 1} and w["samples"] == 1
    assert 0.3 < w["readiness"] <= 1.0  # two summaries of the same note are close in embedding space
    assert w["supported"] == 1.0  # an extractive summary is verbatim


def test_shadow_is_skipped_while_real_traffic_waits(srv: ServerProc) -> None:
    before = sum(readiness(srv)["triage"]["counts"].values())
    stop = threading.Event()

    def burst() -> None:  # keeps the embedding model's queue full of real work
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                c.post(srv.url + "/v1/embeddings", json={"model": "minilm-l6-v2", "input": [NOTE] * 256})

    threads = [threading.Thread(target=burst) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        for _ in range(3):
            assert ask(srv, "triage-model", CHEST).headers["x-understudy-route"] == "cloud"
    finally:
        stop.set()
        for t in threads:
            t.join()
    w = wait_counts(srv, "triage", before + 3)
    assert w["counts"].get("skipped", 0) >= 1


def test_no_request_or_answer_text_reaches_the_journal(srv: ServerProc) -> None:
    assert srv.config_path is not None
    conn = sqlite3.connect(srv.config_path.parent / "state" / "journal.sqlite3")
    time.sleep(0.2)
    rows = conn.execute("SELECT * FROM events").fetchall()
    shadow_rows = conn.execute("SELECT reason, detail FROM events WHERE kind = 'shadow'").fetchall()
    assert shadow_rows and all(json.loads(detail) is not None for _, detail in shadow_rows)
    dump = json.dumps(rows).lower()
    for words in ("crushing chest pain", "physiotherapy", "toddler", "pneumonia", "amoxicillin", "common cold", "sweating"):
        assert words not in dump, words
