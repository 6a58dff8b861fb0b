"""Evaluate the workloads a box takes over, on held-out data, through the real server.

    .venv/bin/python scripts/eval_workloads.py                 # starts its own server (embedded default)
    .venv/bin/python scripts/eval_workloads.py --url http://127.0.0.1:8080 --model triage-minilm
    .venv/bin/python scripts/eval_workloads.py --json eval.json --markdown eval.md
    .venv/bin/python scripts/eval_workloads.py --skip-abstractive   # summaries: extractive only (fast)

Triage: every message of the classifier's examples file marked ``"split": "heldout"`` (never
seen by training) goes through ``POST /v1/triage``. Reported, as a markdown table and as JSON:
- accuracy, macro-F1 and per-class recall on the messages it answered (``emergent`` first);
- the abstention rate (``needs_human_review``), counted separately, and per true label;
- how many emergent messages were given a less urgent label (missed), and how many abstained;
- the confusion matrix (true label by row, answer by column, abstentions in their own column);
- the targets: macro-F1 >= 0.90, recall of the first (most urgent) label >= 0.97, abstentions <= 10 %.

Summaries: every note in ``models/data/summaries/notes/`` (written for the project, up to
about 12,900 tokens) is summarised with both methods through ``POST /v1/summarize``. Reported
per note and method: time, sentences, the share of summary sentences supported by the source
(extractive: verbatim, checked character by character against ``source_span``; abstractive:
the share the support check accepted, with the dropped count), and compression (summary words /
note words). Then the triage latency during a burst of 32 extractive summaries of the longest
note, against triage's idle latency plus one embedding batch (target: within it).

Exit status 0 when every target holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from bench_serving import launch_understudy  # noqa: E402

from models.classifier import ABSTAIN_LABEL, read_examples  # noqa: E402

NOTES = HERE.parent / "models" / "data" / "summaries" / "notes"

TARGETS = {"macro_f1": 0.90, "first_label_recall": 0.97, "abstention_rate": 0.10}


def triage_metrics(truth: list[str], answers: list[str], labels: list[str]) -> dict[str, Any]:
    """Pure: metrics of ``answers`` against ``truth`` (abstentions are ``needs_human_review``)."""
    answered = [(t, a) for t, a in zip(truth, answers) if a != ABSTAIN_LABEL]
    per_class: dict[str, dict[str, float]] = {}
    for label in labels:
        tp = sum(1 for t, a in answered if t == label and a == label)
        support = sum(1 for t, _ in answered if t == label)
        predicted = sum(1 for _, a in answered if a == label)
        recall = tp / support if support else 0.0
        precision = tp / predicted if predicted else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"recall": recall, "precision": precision, "f1": f1, "support": support}
    columns = [*labels, ABSTAIN_LABEL]
    confusion = {t: {c: sum(1 for tt, a in zip(truth, answers) if tt == t and a == c) for c in columns} for t in labels}
    first = labels[0]
    return {
        "messages": len(truth),
        "answered": len(answered),
        "accuracy": sum(1 for t, a in answered if t == a) / len(answered) if answered else 0.0,
        "macro_f1": sum(c["f1"] for c in per_class.values()) / len(labels),
        "per_class": per_class,
        "abstention_rate": 1 - len(answered) / len(truth) if truth else 0.0,
        "abstained_by_label": {t: confusion[t][ABSTAIN_LABEL] for t in labels},
        f"{first}_missed": sum(1 for t, a in answered if t == first and labels.index(a) > 0),
        f"{first}_abstained": confusion[first][ABSTAIN_LABEL],
        "confusion": confusion,
    }


def evaluate_triage(url: str, model: str, examples: Path, labels: list[str], batch: int = 32) -> dict[str, Any]:
    heldout = [e for e in read_examples(examples, tuple(labels)) if e.split == "heldout"]
    if not heldout:
        raise SystemExit(f"{examples} has no held-out examples (\"split\": \"heldout\")")
    answers: list[dict[str, Any]] = []
    started = time.perf_counter()
    with httpx.Client(timeout=120) as client:
        for i in range(0, len(heldout), batch):
            r = client.post(url + "/v1/triage", json={"model": model, "input": [e.text for e in heldout[i:i + batch]]})
            r.raise_for_status()
            answers.extend(r.json()["data"])
    seconds = time.perf_counter() - started
    metrics = triage_metrics([e.label for e in heldout], [a["label"] for a in answers], labels)
    metrics["red_flag_raised"] = sum(1 for a in answers if a.get("reason") == "red_flag")
    metrics["abstain_reasons"] = {}
    for a in answers:
        if a["abstained"]:
            metrics["abstain_reasons"][a["reason"]] = metrics["abstain_reasons"].get(a["reason"], 0) + 1
    metrics["seconds"] = round(seconds, 3)
    metrics["messages_per_s"] = round(len(heldout) / seconds, 1)
    first = labels[0]
    metrics["targets"] = {
        "macro_f1 >= 0.90": metrics["macro_f1"] >= TARGETS["macro_f1"],
        f"{first} recall >= 0.97": metrics["per_class"][first]["recall"] >= TARGETS["first_label_recall"],
        "abstentions <= 10 %": metrics["abstention_rate"] <= TARGETS["abstention_rate"],
    }
    return metrics


def triage_markdown(m: dict[str, Any], labels: list[str], model: str) -> str:
    first = labels[0]
    lines = [f"### Triage: `{model}` on {m['messages']} held-out messages", "",
             "| metric | value |", "|---|---|",
             f"| accuracy (answered) | {m['accuracy']:.3f} |",
             f"| macro-F1 (answered) | {m['macro_f1']:.3f} |"]
    lines += [f"| recall `{label}` | {m['per_class'][label]['recall']:.3f} ({m['per_class'][label]['support']} answered) |" for label in labels]
    lines += [f"| abstentions | {m['abstention_rate'] * 100:.1f} % ({m['messages'] - m['answered']} of {m['messages']}: "
              + ", ".join(f"{k} {v}" for k, v in sorted(m['abstain_reasons'].items())) + ") |",
              f"| `{first}` given a less urgent label | {m[f'{first}_missed']} |",
              f"| `{first}` abstained (sent to a human) | {m[f'{first}_abstained']} |",
              f"| raised by a red flag | {m['red_flag_raised']} |",
              f"| time | {m['seconds']} s ({m['messages_per_s']} messages/s, batches of 32) |", "",
              "Confusion matrix (rows: true label; columns: answer):", "",
              "| true \\ answer | " + " | ".join([*labels, ABSTAIN_LABEL]) + " |",
              "|---" * (len(labels) + 2) + "|"]
    for t in labels:
        lines.append(f"| {t} | " + " | ".join(str(m["confusion"][t][c]) for c in [*labels, ABSTAIN_LABEL]) + " |")
    lines += ["", "Targets: " + ", ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in m["targets"].items())]
    return "\n".join(lines)


# -- summaries ------------------------------------------------------------------------------------
def evaluate_summaries(url: str, abstractive: bool, max_words: int = 150) -> list[dict[str, Any]]:
    rows = []
    methods = ["extractive", "abstractive"] if abstractive else ["extractive"]
    with httpx.Client(timeout=900) as client:
        for note in sorted(NOTES.glob("*.txt"), key=lambda p: -p.stat().st_size):
            text = note.read_text()
            for method in methods:
                started = time.perf_counter()
                r = client.post(url + "/v1/summarize", json={"input": text, "method": method, "max_words": max_words})
                seconds = time.perf_counter() - started
                r.raise_for_status()
                body = r.json()
                sentences = body["sentences"]
                if method == "extractive":
                    supported = sum(1 for s in sentences if text[s["source_span"][0]:s["source_span"][1]] == s["text"])
                    share = supported / len(sentences) if sentences else 0.0
                else:
                    written = len(sentences) + body["unsupported_dropped"]
                    share = len(sentences) / written if written else 0.0
                rows.append({"note": note.name, "note_words": len(text.split()), "method": method, "seconds": round(seconds, 2),
                             "sentences": len(sentences), "dropped": body["unsupported_dropped"], "supported_share": round(share, 3),
                             "summary_words": len(body["summary"].split()),
                             "compression": round(len(body["summary"].split()) / len(text.split()), 4), "parts": body["parts"]})
                print(f"  {note.name:<26} {method:<11} {seconds:6.2f} s  {len(sentences):>3} sentences  "
                      f"supported {share * 100:5.1f} %  dropped {body['unsupported_dropped']}", flush=True)
    return rows


def triage_during_burst(url: str, burst: int = 32) -> dict[str, Any]:
    """Triage latency alone, then while ``burst`` extractive summaries of the longest note run."""
    import asyncio

    note = max(NOTES.glob("*.txt"), key=lambda p: p.stat().st_size).read_text()
    message = {"input": "my husband has crushing chest pain and is sweating"}

    async def run() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=burst + 8)) as c:
            idle = []
            for _ in range(20):
                t = time.perf_counter()
                (await c.post("/v1/triage", json=message)).raise_for_status()
                idle.append(time.perf_counter() - t)
            before = (await c.get("/admin/status")).json()["models"]["minilm-l6-v2"]["engine"]
            started = time.perf_counter()
            tasks = [asyncio.create_task(c.post("/v1/summarize", json={"input": note})) for _ in range(burst)]
            during: list[float] = []
            while not all(t.done() for t in tasks):
                t = time.perf_counter()
                (await c.post("/v1/triage", json=message)).raise_for_status()
                during.append(time.perf_counter() - t)
                await asyncio.sleep(0.05)
            for t in tasks:
                t.result().raise_for_status()
            wall = time.perf_counter() - started
            after = (await c.get("/admin/status")).json()["models"]["minilm-l6-v2"]["engine"]
        batches = after["batches"] - before["batches"]
        batch_s = wall / batches if batches else float("nan")
        idle_p50 = sorted(idle)[len(idle) // 2]
        return {"burst": burst, "burst_seconds": round(wall, 2), "embedding_batches": batches,
                "one_batch_ms": round(batch_s * 1000, 1), "idle_p50_ms": round(idle_p50 * 1000, 1),
                "during_p50_ms": round(sorted(during)[len(during) // 2] * 1000, 1), "during_max_ms": round(max(during) * 1000, 1),
                "during_samples": len(during), "target_ms": round((idle_p50 + batch_s) * 1000, 1),
                "within_target": sorted(during)[len(during) // 2] <= idle_p50 + batch_s}

    return asyncio.run(run())


def summaries_markdown(rows: list[dict[str, Any]], burst: dict[str, Any] | None) -> str:
    lines = ["### Summaries (notes written for the project; `max_words` 150)", "",
             "| note | words | method | time | sentences | supported | dropped | compression | parts |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['note']} | {r['note_words']} | {r['method']} | {r['seconds']} s | {r['sentences']} | "
                     f"{r['supported_share'] * 100:.0f} % | {r['dropped']} | {r['compression'] * 100:.1f} % | {r['parts']} |")
    if burst:
        lines += ["", f"Triage during a burst of {burst['burst']} extractive summaries of the longest note "
                  f"({burst['burst_seconds']} s, {burst['embedding_batches']} embedding batches, one batch ≈ {burst['one_batch_ms']} ms): "
                  f"p50 {burst['during_p50_ms']} ms (max {burst['during_max_ms']} ms, {burst['during_samples']} requests) against "
                  f"{burst['idle_p50_ms']} ms idle; target idle + one batch = {burst['target_ms']} ms: "
                  f"{'PASS' if burst['within_target'] else 'FAIL'}"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running Understudy (default: start one with the embedded default)")
    parser.add_argument("--model", default="triage-minilm", help="the classifier to evaluate")
    parser.add_argument("--examples", type=Path, help="examples file (default: the classifier's own, from /admin/status)")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the markdown table here")
    parser.add_argument("--skip-summaries", action="store_true")
    parser.add_argument("--skip-abstractive", action="store_true", help="summaries: extractive only (abstractive takes minutes)")
    args = parser.parse_args()

    server = None
    tmp = tempfile.TemporaryDirectory(prefix="understudy-eval-")
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            server = launch_understudy(Path(tmp.name))
            url = server.url
        status = httpx.get(url + "/admin/status", timeout=10).json()["models"].get(args.model)
        if status is None or status.get("kind") != "classifier" or status.get("state") != "ready":
            raise SystemExit(f"{args.model} is not a ready classifier on {url}")
        labels = list(status["settings"]["labels"])
        examples = args.examples or Path(status["path"])
        metrics = evaluate_triage(url, args.model, examples, labels)
        results: dict[str, Any] = {"triage": {"model": args.model, "examples": str(examples), "labels": labels, **metrics}}
        table = triage_markdown(metrics, labels, args.model)
        print(table)
        ok = all(metrics["targets"].values())
        if not args.skip_summaries:
            print("\nSummaries:", flush=True)
            rows = evaluate_summaries(url, not args.skip_abstractive)
            burst = triage_during_burst(url)
            results["summaries"] = {"notes": rows, "triage_during_burst": burst}
            extract = [r for r in rows if r["method"] == "extractive"]
            ok = ok and burst["within_target"] and all(r["supported_share"] == 1.0 for r in extract)
            section = summaries_markdown(rows, burst)
            print("\n" + section)
            table += "\n\n" + section
        if args.markdown:
            args.markdown.write_text(table + "\n")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        else:
            print("\n" + json.dumps(results, indent=2))
        return 0 if ok else 1
    finally:
        if server is not None:
            server.stop()
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
