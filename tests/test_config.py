"""Configuration parsing: defaults, overrides, and one clear error naming the key (exit code 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from models.catalog import MINILM_ID, SMOLLM2_ID, TRIAGE_ID
from server.config import ConfigError, load_config, parse_config, with_overrides
from tests.conftest import ROOT


def test_no_file_means_the_embedded_default_fully_local() -> None:
    config = load_config(None, env={})
    assert config.server.host == "127.0.0.1" and config.server.port == 8080
    assert [m.id for m in config.models] == [SMOLLM2_ID, MINILM_ID, TRIAGE_ID]
    assert config.server.api_keys == ()
    triage, summaries = config.workloads  # the built-in workloads: local-only
    assert (triage.name, triage.local_model, triage.priority, triage.local_only) == ("triage", TRIAGE_ID, "high", True)
    assert (summaries.name, summaries.summary_method, summaries.embedding_model, summaries.local_only) == (
        "summaries", "extractive", MINILM_ID, True)


def test_a_users_workload_replaces_the_built_in_one_of_the_same_name() -> None:
    config = parse_config({"workloads": [{"name": "triage", "fallback": "local", "local_model": SMOLLM2_ID}]}, Path("."), env={})
    assert [(w.name, w.local_model, w.local_only) for w in config.workloads] == [
        ("triage", SMOLLM2_ID, False), ("summaries", SMOLLM2_ID, True)]
    assert parse_config({"server": {"embedded_models": False}, "models": {"m": {
        "kind": "chat", "path": "/x.gguf", "sha256": "a" * 64}}}, Path("."), env={}).workloads == ()


def test_environment_variable_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "u.toml"
    f.write_text("[server]\nport = 9001\n")
    assert load_config(None, env={"UNDERSTUDY_CONFIG": str(f)}).server.port == 9001


def test_flags_override_the_file(tmp_path: Path) -> None:
    f = tmp_path / "u.toml"
    f.write_text('[server]\nhost = "0.0.0.0"\nport = 9001\n')
    config = with_overrides(load_config(f, env={}), host="127.0.0.1", port=9100)
    assert (config.server.host, config.server.port) == ("127.0.0.1", 9100)


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    f = tmp_path / "u.toml"
    f.write_text(f'[models.mine]\nkind = "chat"\npath = "models/m.gguf"\nsha256 = "{"a" * 64}"\nslots = 2\n')
    spec = next(m for m in load_config(f, env={}).models if m.id == "mine")
    assert spec.path == tmp_path / "models" / "m.gguf"
    assert spec.options.slots == 2


def test_api_keys_come_from_the_named_environment_variable() -> None:
    config = parse_config({"server": {"api_key_env": "KEYS"}}, Path("."), env={"KEYS": "k1, k2"})
    assert config.server.api_keys == ("k1", "k2")


@pytest.mark.parametrize("data,key", [
    ({"server": {"port": "eighty"}}, "server.port"),
    ({"server": {"port": 70000}}, "server.port"),
    ({"server": {"prot": 1}}, "server.prot"),
    ({"server": {"api_key_env": "NOPE_NOT_SET"}}, "server.api_key_env"),
    ({"models": {"m": {"kind": "chat", "path": "/x.gguf"}}}, "models.m.sha256"),
    ({"models": {"m": {"kind": "chat", "sha256": "a" * 64}}}, "models.m.path"),
    ({"models": {"m": {"kind": "chat", "path": "/x.gguf", "sha256": "xyz"}}}, "models.m.sha256"),
    ({"models": {"m": {"kind": "vision", "path": "/x.gguf", "sha256": "a" * 64}}}, "models.m.kind"),
    ({"models": {"m": {"kind": "embedding", "path": "/x.onnx", "sha256": "a" * 64}}}, "models.m.tokenizer"),
    ({"models": {"m": {"kind": "chat", "path": "/x.gguf", "sha256": "a" * 64, "slots": 0}}}, "models.m.slots"),
    ({"models": {SMOLLM2_ID: {"slots": "many"}}}, f"models.{SMOLLM2_ID}.slots"),
    ({"models": {TRIAGE_ID: {"abstain_below": 1.5}}}, f"models.{TRIAGE_ID}.abstain_below"),
    ({"models": {TRIAGE_ID: {"labels": ["emergent", "routine"]}}}, f"models.{TRIAGE_ID}.examples"),
    ({"models": {TRIAGE_ID: {"red_flag_label": "purple"}}}, f"models.{TRIAGE_ID}.red_flag_label"),
    ({"models": {"c": {"kind": "classifier", "embedding_model": SMOLLM2_ID}}}, "models.c.embedding_model"),
    ({"workloads": [{"name": "w", "fallback": "local", "local_model": TRIAGE_ID, "priority": "urgent"}]}, "workloads[0].priority"),
    ({"workloads": [{"name": "w", "fallback": "local", "local_model": TRIAGE_ID, "output_template": "{\"l\": {label}}"}]},
     "workloads[0].output_template"),
    ({"workloads": [{"name": "w", "fallback": "local", "local_model": TRIAGE_ID, "local_notice": "local!"}]},
     "workloads[0].local_notice"),
    ({"workloads": [{"name": "w", "fallback": "local", "local_model": SMOLLM2_ID, "output_template": "{label}"}]},
     "workloads[0].output_template"),
    ({"workloads": [{"name": "w", "fallback": "local", "local_model": SMOLLM2_ID, "summary_method": "poetic"}]},
     "workloads[0].summary_method"),
    ({"workloads": [{"name": "w", "fallback": "local", "local_model": MINILM_ID, "summary_method": "abstractive"}]},
     "workloads[0].local_model"),
    ({"workloads": [{"name": "w", "fallback": "local", "local_model": SMOLLM2_ID, "max_words": 50}]},
     "workloads[0].max_words"),
    ({"models": {SMOLLM2_ID: {"max_batch_requests": 8}}}, f"models.{SMOLLM2_ID}.max_batch_requests"),
    ({"models": {MINILM_ID: {"slots": 4}}}, f"models.{MINILM_ID}.slots"),
    ({"server": {"embedded_models": False}}, "models"),
    ({"workload": {}}, "(top level).workload"),
])
def test_invalid_config_names_the_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, Path("."), env={})
    assert info.value.key == key


def test_invalid_config_exits_2_with_one_clear_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[server]\nport = 'eighty'\n")
    out = subprocess.run([sys.executable, "-m", "server", "serve", "--config", str(f)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == "understudy: config error: server.port: expected an integer, got 'eighty'"
    f.write_text("[server\n")
    out = subprocess.run([sys.executable, "-m", "server", "serve", "--config", str(f)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "not valid TOML" in out.stderr
    out = subprocess.run([sys.executable, "-m", "server", "serve", "--config", str(tmp_path / "absent.toml")], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_the_shipped_example_config_parses(tmp_path: Path) -> None:
    config = load_config(ROOT / "understudy.example.toml", env={"OPENAI_API_KEY": "sk-example"})
    assert [w.name for w in config.workloads] == ["triage", "summaries", "general"]
    assert [w.covered for w in config.workloads] == [True, True, False]
    up = config.default_upstream
    assert up is not None and up.name == "openai" and up.api_key == "sk-example"
    assert up.breaker.failure_threshold == 3 and up.connect_timeout_s == 2.0


@pytest.mark.parametrize("data,key", [
    ({"upstreams": [{"name": "a", "base_url": "http://x/v2"}]}, "upstreams[0].base_url"),
    ({"upstreams": [{"name": "a", "base_url": "https://x/v1", "api_key_env": "UNSET_KEY_VAR"}]}, "upstreams[0].api_key_env"),
    ({"upstreams": [{"name": "a", "base_url": "https://x/v1"}, {"name": "a", "base_url": "https://y/v1"}]}, "upstreams[1].name"),
    ({"upstreams": [{"name": "a", "base_url": "https://x/v1", "failure_rate": 2.0}]}, "upstreams[0].failure_rate"),
    ({"upstreams": [{"name": "a", "base_url": "https://x/v1"}], "workloads": [{"name": "w", "upstream": "b"}]}, "workloads[0].upstream"),
    ({"upstreams": [{"name": "a", "base_url": "https://x/v1"}], "workloads": [{"name": "w", "fallback": "local"}]}, "workloads[0].local_model"),
    ({"upstreams": [{"name": "a", "base_url": "https://x/v1"}], "workloads": [{"name": "w", "fallback": "local", "local_model": "nope"}]}, "workloads[0].local_model"),
    ({"upstreams": [{"name": "a", "base_url": "https://x/v1"}], "workloads": [{"name": "w", "fallback": "maybe"}]}, "workloads[0].fallback"),
    ({"workloads": [{"name": "w"}]}, "workloads[0].fallback"),
    ({"upstreams": [{"name": "a", "base_url": "https://x/v1"}], "workloads": [{"name": "w", "models": ["m"]}, {"name": "v", "models": ["m"]}]}, "workloads[1]"),
    ({"upstreams": [{"name": "a", "base_url": "https://x/v1"}], "workloads": [{"name": SMOLLM2_ID}]}, "workloads[0]"),
    ({"upstreams": [{"name": "a", "base_url": "https://x/v1"}], "workloads": [{"name": "w"}, {"name": "w"}]}, "workloads[1]"),
    ({"upstreams": [{"name": "a", "base_url": "https://x/v1"}], "workloads": [{"name": "w", "local_model": SMOLLM2_ID}]}, "workloads[0].local_model"),
])
def test_invalid_failover_config_names_the_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, Path("."), env={})
    assert info.value.key == key


_UP = [{"name": "a", "base_url": "https://x/v1"}]


def _covered(**keys: object) -> dict:
    return {"upstreams": _UP, "workloads": [{"name": "w", "fallback": "local", "local_model": SMOLLM2_ID, **keys}]}


@pytest.mark.parametrize("data,key", [
    (_covered(first_token_deadline_s=0), "workloads[0].first_token_deadline_s"),
    (_covered(first_token_deadline_s=-1.5), "workloads[0].first_token_deadline_s"),
    (_covered(first_token_deadline_s="soon"), "workloads[0].first_token_deadline_s"),
    (_covered(deadline_min_s=5.0, deadline_max_s=3.0), "workloads[0].deadline_min_s"),
    (_covered(deadline_max_s=0), "workloads[0].deadline_max_s"),
    (_covered(hedge_budget=1.5), "workloads[0].hedge_budget"),
    ({"upstreams": _UP, "workloads": [{"name": "w", "first_token_deadline_s": 2.0}]}, "workloads[0].first_token_deadline_s"),
    ({"upstreams": [{**_UP[0], "slow_multiple": 0.5}]}, "upstreams[0].slow_multiple"),
    (_covered(shadow_rate=0.5), "workloads[0].shadow_rate"),  # an LLM workload: nothing to compare
    ({"upstreams": _UP, "workloads": [{"name": "w", "fallback": "local", "local_model": TRIAGE_ID, "shadow_rate": 1.5}]},
     "workloads[0].shadow_rate"),
    ({"upstreams": _UP, "workloads": [{"name": "w", "shadow_rate": 0.1}]}, "workloads[0].shadow_rate"),
    ({"server": {"max_drill_s": 0}}, "server.max_drill_s"),
    (_covered(target_p95_s=-1), "workloads[0].target_p95_s"),
    ({"upstreams": [{**_UP[0], "slow_window_s": -1}]}, "upstreams[0].slow_window_s"),
])
def test_invalid_deadline_and_slow_settings_name_the_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, Path("."), env={})
    assert info.value.key == key


def test_deadline_settings_parse() -> None:
    config = parse_config({**_covered(first_token_deadline_s=1.5, hedge_budget=0.5),
                           "upstreams": [{**_UP[0], "slow_multiple": 4, "slow_min_samples": 5}]}, Path("."), env={})
    wl = next(w for w in config.workloads if w.name == "w")
    assert wl.hedge.deadline_s == 1.5 and wl.hedge.budget == 0.5 and wl.hedge.max_s == 3.5
    assert config.upstreams[0].slow.multiple == 4.0 and config.upstreams[0].slow.min_samples == 5
    auto = parse_config(_covered(first_token_deadline_s="auto"), Path("."), env={})
    assert next(w for w in auto.workloads if w.name == "w").hedge.deadline_s is None


def test_a_tuned_fragment_adds_to_a_config_and_a_conflict_names_both_files(tmp_path: Path) -> None:
    base = tmp_path / "hospital.toml"
    base.write_text(f'[server]\nport = 9000\n[models.{SMOLLM2_ID}]\nslots = 4\n'
                    '[[workloads]]\nname = "notes"\nfallback = "local"\nlocal_model = "' + SMOLLM2_ID + '"\n')
    tuned = tmp_path / "tuned.toml"
    tuned.write_text(f'[models.{SMOLLM2_ID}]\nslots = 4\nthreads = 1\n[models.{MINILM_ID}]\nmax_batch_requests = 16\n')
    config = load_config([base, tuned], env={})
    models = {m.id: m for m in config.models}
    assert config.server.port == 9000
    assert (models[SMOLLM2_ID].options.slots, models[SMOLLM2_ID].options.threads) == (4, 1)
    assert models[MINILM_ID].options.max_batch_requests == 16
    assert "notes" in [w.name for w in config.workloads]
    tuned.write_text(f'[models.{SMOLLM2_ID}]\nslots = 12\n')
    with pytest.raises(ConfigError) as err:
        load_config([base, tuned], env={})
    assert f"models.{SMOLLM2_ID}.slots" in str(err.value) and "hospital.toml" in str(err.value) and "tuned.toml" in str(err.value)
    out = subprocess.run([sys.executable, "-m", "server", "serve", "--config", str(base), "--config", str(tuned)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and "conflict" in out.stderr and out.stderr.count("\n") == 1
