"""``scripts/bench.py`` (``understudy bench``): the hardware benchmark end to end on a tiny sweep,
what it writes (results, report, plots, the tuned config, the capacity file the drill reads), and
the input it refuses before measuring anything."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--quick", "--threads", "2", "--batches", "8", "--embed-batches", "1,32", "--levels", "2", "--seconds", "3",
        "--engine-seconds", "1", "--capacity-steps", "2", "--validation-rounds", "1", "--validation-seconds", "2",
        "--max-tokens", "8"]
# The end-to-end run takes about 90 s on an idle 2-core box; much longer when the box is shared.
pytestmark = pytest.mark.timeout(900)


def bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen([sys.executable, str(BENCH), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the benchmark stops its servers on the way out
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"the benchmark took longer than {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@dataclass
class Run:
    done: subprocess.CompletedProcess[str]
    out: Path
    fragment: Path
    state: Path
    seconds: float

    @property
    def results(self) -> dict:
        return json.loads((self.out / "results.json").read_text())


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    tmp = tmp_path_factory.mktemp("bench")
    base = tmp / "base.toml"
    base.write_text(f'[server]\nstate_dir = "{tmp / "state"}"\n')
    out = tmp / "out" / "nested"  # created by the benchmark
    fragment = tmp / "tuned.toml"
    t0 = time.monotonic()
    done = bench(*TINY, "--out", str(out), "--config", str(base), "--write-config", str(fragment), timeout=800)
    seconds = time.monotonic() - t0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return Run(done, out, fragment, tmp / "state", seconds)


def test_quick_run_measures_every_section(run: Run) -> None:
    r = run.results
    assert r["complete"] is True and not (run.out / "results.partial.json").exists()
    assert r["cpu_model"] and r["usable_cores"] >= 1
    assert r["admin_hardware"]["hardware"]["cpu"] and r["admin_hardware"]["models"]["smollm2-135m-instruct"]["settings"]
    chat = r["sweeps"]["chat"]["smollm2-135m-instruct"]["rows"]
    assert chat and all(x["gen_tok_s"] > 0 and x["step_ms"] > 0 for x in chat)
    assert any(x["pp_tok_s"] and x["pp_tok_s"] > 0 for x in chat)
    emb = r["sweeps"]["embeddings"]["minilm-l6-v2"]["rows"]
    assert {x["batch"] for x in emb} == {1, 32} and all(x["per_s"] > 0 for x in emb)
    triage = r["sweeps"]["triage"]["triage-minilm"]["rows"]
    assert {x["batch"] for x in triage} == {1, 32} and all(x["per_s"] > 0 for x in triage)
    serving = r["serving"]["rows"]
    assert [x["c"] for x in serving] == [2] and serving[0]["tok_s"] > 0 and serving[0]["ttft50"] > 0
    assert set(r["capacity"]) == {"triage", "summaries"}
    assert r["capacity"]["triage"]["target_p95_s"] == 1.0 and r["capacity"]["summaries"]["target_p95_s"] == 5.0
    for name, c in r["capacity"].items():
        assert c["rate_per_min"] > 0, (name, r["capacity_search"][name]["steps"])
        assert 0 < c["p95_s"] <= c["target_p95_s"]
        assert len(r["capacity_search"][name]["steps"]) == 2
    v = r["validation"]
    assert len(v["rounds"]) == 1 and v["chat_ratio"] > 0 and v["triage_ratio"] > 0 and v["settings_applied"] is True
    assert r["timings"]["total_s"] > 0
    assert "Total time:" in run.done.stdout


def test_report_has_every_section_and_a_capacity_line(run: Run) -> None:
    text = (run.out / "report.md").read_text()
    cpu = run.results["cpu_model"]
    for heading in ("## Hardware", "## Plan and served settings", "## Warnings", "## Engine sweeps", "## Serving sweep",
                    "## Capacity", "## Tuned settings", "## Validation", "## Plots"):
        assert heading in text, heading
    assert re.search(r"this box sustains \d+ triage requests a minute at p95 ≤ 1 s", text)
    assert re.search(r"this box sustains \d+ summaries requests a minute at p95 ≤ 5 s", text)
    assert f"## Engine sweeps ({cpu}" in text and f"## Capacity ({cpu}" in text
    assert "--write-config" in text and str(run.fragment) in text  # the exact command


def test_plots_are_real_pngs(run: Run) -> None:
    names = run.results["plots"]
    assert set(names) == {"throughput_vs_threads.png", "throughput_vs_batch.png", "serving_vs_concurrency.png",
                          "capacity_latency_vs_rate.png"}
    for name in names:
        data = (run.out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name


def test_capacity_is_copied_to_the_state_dir_for_the_drill(run: Run) -> None:
    copied = json.loads((run.state / "capacity.json").read_text())
    assert {k: v["rate_per_min"] for k, v in copied.items()} == \
        {k: v["rate_per_min"] for k, v in run.results["capacity"].items()}

    from server.cli_drill import load_capacity, rate_from_capacity

    config = run.state.parent / "base.toml"
    path, capacity = load_capacity(str(config))
    assert path == run.state / "capacity.json"
    rate, weights, line = rate_from_capacity(path, capacity, [{"name": "triage"}, {"name": "summaries"}, {"name": "other"}])
    triage, summaries = copied["triage"]["rate_per_min"], copied["summaries"]["rate_per_min"]
    assert rate == (triage + summaries) / 2 and weights == [triage, summaries, 0.0]
    assert str(path) in line and "other" in line


def test_written_config_is_served_as_written(run: Run, start_server) -> None:  # type: ignore[no-untyped-def]
    text = run.fragment.read_text()
    fragment = tomllib.loads(text)["models"]
    assert set(fragment) == {"smollm2-135m-instruct", "minilm-l6-v2"}
    assert set(fragment["smollm2-135m-instruct"]) == {"threads", "slots", "kv_tokens", "batch_tokens", "max_waiting"}
    assert set(fragment["minilm-l6-v2"]) == {"threads", "max_batch_requests", "max_waiting"}
    assert "this box sustains" in text and "kept: kept" not in text
    assert all(re.search(rf"^{k} = \S+ +# (kept|tuned|follows|pinned): ", text, re.M) for k in fragment["minilm-l6-v2"])
    with start_server(text) as srv:  # waits for /ready 200
        assert httpx.get(srv.url + "/ready", timeout=10).status_code == 200
        served = httpx.get(srv.url + "/admin/hardware", timeout=10).json()["models"]
    for model_id, values in fragment.items():
        settings = served[model_id]["settings"]
        assert {k: settings[k] for k in values} == values


def test_unwritable_out_exits_2_and_creates_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = bench("--quick", "--out", str(blocker / "results"), "--write-config", str(tmp_path / "t.toml"))
    assert done.returncode == 2
    assert "--out" in done.stderr and "a-file" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_conflicting_base_config_exits_2_before_measuring(tmp_path: Path) -> None:
    base = tmp_path / "base.toml"
    base.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n\n[models.smollm2-135m-instruct]\nslots = 3\n')
    t0 = time.monotonic()
    done = bench("--quick", "--config", str(base), "--out", str(tmp_path / "out"), "--write-config", str(tmp_path / "t.toml"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert time.monotonic() - t0 < 30
    line = done.stderr.strip().splitlines()[-1]
    assert "slots = 3" in line and "smollm2-135m-instruct" in line and re.search(r"would set slots = \d+", line)
    assert not (tmp_path / "t.toml").exists() and not (tmp_path / "out").exists() and not (tmp_path / "state").exists()


def test_existing_config_file_is_not_overwritten_without_force(tmp_path: Path) -> None:
    existing = tmp_path / "t.toml"
    existing.write_text("# mine\n")
    done = bench("--quick", "--out", str(tmp_path / "out"), "--write-config", str(existing))
    assert done.returncode == 2 and "--force" in done.stderr
    assert existing.read_text() == "# mine\n" and not (tmp_path / "out").exists()


def test_drill_synthetic_last_without_a_report_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n')
    done = subprocess.run([sys.executable, "-m", "server", "drill", "--url", "http://127.0.0.1:9", "--synthetic", "last",
                           "--config", str(config), "--duration", "1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"no capacity report at {tmp_path / 'state' / 'capacity.json'}" in done.stderr and "understudy bench" in done.stderr


def test_understudy_bench_takes_the_scripts_arguments() -> None:
    from server import cli_bench

    parser = argparse.ArgumentParser(prog="understudy")
    cli_bench.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--quick", "--threads", "1,2", "--levels", "8,1", "--out", "x", "--write-config", "y.toml"])
    assert args.quick and args.threads == [1, 2] and args.levels == [1, 8] and args.out == Path("x")
    assert args.write_config == Path("y.toml") and callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--threads", "0"])
