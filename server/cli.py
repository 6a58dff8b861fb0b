"""The ``understudy`` command.

    understudy serve [--config FILE] [--host H] [--port P]
    understudy models list [--config FILE] [--json]
    understudy models pull URL --id ID --kind chat|embedding --sha256 HEX [--tokenizer URL --tokenizer-sha256 HEX]
    understudy models verify [--config FILE] [--json]
    understudy hardware [--json]
    understudy events [--config FILE] [--limit N] [--kind route|breaker|drill] [--json]
    understudy drill [--url URL] [--duration S] [--upstreams A,B | --workloads W] [--synthetic RATE] [--abort]

Exit status: 0 on success, 2 for a configuration or usage error (the message names the key),
1 when ``events`` finds no journal yet, a ``models pull`` fails or ``models verify`` finds a bad file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from server.config import Config, ConfigError, load_config, with_overrides
from server.keys import KeyFileError

from hardware.tuning import MIB


def _setup_logging(level: str, fmt: str = "text") -> None:
    from server.logs import setup_logging

    setup_logging(level, fmt)


def _load(args: argparse.Namespace) -> Config:
    config = load_config([Path(p) for p in args.config] if args.config else None)
    return with_overrides(config, getattr(args, "host", None), getattr(args, "port", None))


def _refuse_insecure(config: Config, insecure: bool) -> str | None:
    """Why this config must not start (one line), or None."""
    from server.config import is_loopback

    from server.keys import KeyStore

    server = config.server
    has_keys = bool(KeyStore(server.api_keys, server.admin_key, server.metrics_key, server.key_file).keys)
    if not is_loopback(server.host) and not has_keys and not insecure:
        return (f"refusing to listen on {server.host} without API keys: anyone on the network could use it. Set "
                "UNDERSTUDY_API_KEYS (and UNDERSTUDY_ADMIN_KEY), or [server] key_file, or pass --insecure-no-auth")
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args)
    _setup_logging(config.server.log_level, args.log_format or config.server.log_format)
    why = _refuse_insecure(config, args.insecure_no_auth)
    if why:
        print(f"understudy: {why}", file=sys.stderr)
        return 2
    import asyncio
    import signal

    import uvicorn

    from hardware.detect import detect
    from server.app import build_asgi, create_app

    hw = detect()
    log = logging.getLogger("understudy")
    log.info("hardware: %s, %d usable cores, %d MiB usable RAM, GPUs: %s", hw.cpu.model, hw.usable_cores,
             hw.usable_memory_bytes // MIB, ", ".join(g.name for g in hw.gpu.gpus) or f"none ({hw.gpu.reason})")
    log.info("config: %s", config.source or "none (embedded default, fully local)")
    app = create_app(config, hw)
    drain, events = app.state.drain, app.state.events
    server_cfg = config.server
    uv_config = uvicorn.Config(
        build_asgi(app), host=server_cfg.host, port=server_cfg.port, log_level=server_cfg.log_level, log_config=None,
        access_log=server_cfg.log_level == "debug", timeout_graceful_shutdown=5, proxy_headers=False,
        ssl_certfile=str(server_cfg.tls_cert) if server_cfg.tls_cert else None,
        ssl_keyfile=str(server_cfg.tls_key) if server_cfg.tls_key else None,
    )

    class DrainingServer(uvicorn.Server):
        """SIGTERM drains (``server.drain``); a second SIGTERM, or SIGINT, ends what is left with
        an error event and stops."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            loop = asyncio.get_event_loop()
            if sig == signal.SIGTERM and drain.state == "serving":
                def begin() -> None:
                    loop.create_task(drain.run(lambda: setattr(self, "should_exit", True),
                                               lambda step, detail: events.record_admin(step, None, detail)))
                loop.call_soon_threadsafe(begin)
                return
            if drain.state != "stopping":
                async def stop() -> None:
                    await drain.finish(lambda step, detail: events.record_admin(step, None, detail))
                    self.should_exit = True
                loop.call_soon_threadsafe(lambda: loop.create_task(stop()))
                return
            self.force_exit = True  # a third signal: stop now (not re-raised: the exit status stays 0)

    DrainingServer(uv_config).run()
    return 0


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def cmd_models(args: argparse.Namespace) -> int:
    from models.integrity import verify

    config = _load(args)
    out: list[dict[str, Any]] = []
    for spec in config.models:
        result = verify(spec)
        out.append({
            "id": spec.id, "kind": spec.kind.value, "format": spec.format.value, "state": result.check.value,
            "source": spec.source, "path": str(spec.path) if spec.path else None, "sha256": spec.sha256,
            "context_length": spec.context_length, "problem": result.message or None,
        })
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    rows = [["ID", "KIND", "FORMAT", "STATE", "SOURCE", "PATH"]]
    rows += [[m["id"], m["kind"], m["format"], m["state"], m["source"], m["path"] or "-"] for m in out]
    print(_table(rows))
    for m in out:
        if m["problem"]:
            print(f"\n{m['id']}: {m['problem']}")
    return 0


def cmd_hardware(args: argparse.Namespace) -> int:
    from hardware.describe import hardware_rows
    from hardware.detect import detect
    from hardware.fallbacks import fallback_warnings
    from models.capabilities import engine_caps

    hw = detect()
    caps = engine_caps()
    warnings = fallback_warnings(hw, caps)
    plan = None
    if args.plan:
        from models.sizing import plan_for

        plan = plan_for(list(_load(args).models), hw, caps)
        warnings += plan.warnings
    if args.json:
        print(json.dumps({**hw.to_dict(), "engines": caps.to_dict(), "warnings": warnings,
                          **({"plan": plan.to_dict()} if plan is not None else {})}, indent=2))
        return 0
    if plan is not None:
        print(_plan_table(plan))
        for warning in warnings:
            print(f"WARNING: {warning}")
        return 0
    rows = hardware_rows(hw, caps)
    print(_table(rows))
    for warning in warnings:
        print(f"WARNING: {warning}")
    return 0


def _plan_table(plan: Any) -> str:
    """``understudy hardware --plan``: one block per model, one row per setting with its reason."""
    rows = [["MODEL", "DEVICE", "SETTING", "VALUE", "WHY"]]
    refused = []
    for m in plan.models:
        if m.refused:
            refused.append(f"REFUSED {m.id}: {m.refused}")
            rows.append([m.id, "-", "-", "refused", "(below)"])
            continue
        first = True
        items = [(k, m.settings.get(k, "")) for k in m.reasons] or [("-", "")]
        for key, value in items:
            rows.append([m.id if first else "", m.device if first else "", key, str(value), m.reasons.get(key, "")])
            first = False
    lines = [_table(rows), "", plan.summary()]
    return "\n".join(lines + refused)


def _export_journal(path: Path, out: Path) -> int:
    """A consistent copy of the journal (SQLite's online backup: safe while the server writes)."""
    import sqlite3

    if out.exists():
        print(f"understudy: {out} exists; choose a new file", file=sys.stderr)
        return 2
    tmp = out.with_name(out.name + ".partial")
    try:
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        dst = sqlite3.connect(tmp)
        with dst:
            src.backup(dst)
        dst.close()
        src.close()
        tmp.replace(out)
    except (OSError, sqlite3.Error) as exc:
        tmp.unlink(missing_ok=True)
        print(f"understudy: could not export the journal to {out}: {exc}", file=sys.stderr)
        return 2
    print(f"journal exported to {out} ({out.stat().st_size} bytes)")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from server.journal import connect, read_recent

    config = _load(args)
    path = config.server.state_dir / "journal.sqlite3"
    if not path.exists():
        print(f"no journal at {path} yet (the server writes it once it has routed a request)", file=sys.stderr)
        return 1
    if args.export:
        return _export_journal(path, Path(args.export))
    conn = connect(path, readonly=True)
    try:
        rows = list(reversed(read_recent(conn, args.limit, args.kind)))
    finally:
        conn.close()
    if args.json:
        from server.box import box_id

        box = box_id()  # the journal is this box's: several boxes' exports stay apart
        print(json.dumps([{**r, "box": box} for r in rows], indent=2))
        return 0
    import time as _time

    table = [["TIME", "KIND", "REQUEST", "WORKLOAD", "UPSTREAM", "ROUTE", "MODEL", "REASON", "STATUS", "MS", "TOKENS"]]
    for r in rows:
        when = _time.strftime("%H:%M:%S", _time.localtime(r["ts"])) + f".{int(r['ts'] * 1000) % 1000:03d}"
        tokens = "" if r["prompt_tokens"] is None else f"{r['prompt_tokens']}+{r['completion_tokens'] or 0}"
        reason = r["reason"] or ""
        if r["kind"] == "breaker" and r["detail"]:
            reason = f"{reason} ({r['detail']})"
        table.append([when, r["kind"], r["request_id"] or "", r["workload"] or "", r["upstream"] or "", r["route"] or "",
                      r["model"] or "", reason, "" if r["status"] is None else str(r["status"]),
                      "" if r["latency_ms"] is None else f"{r['latency_ms']:.1f}", tokens])
    print(_table(table))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="understudy", description="Local OpenAI-compatible server with cloud failover.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    serve.add_argument("--config", action="append", help="TOML config file (default: $UNDERSTUDY_CONFIG, else the embedded "
                       "default); give it again to add a fragment such as `understudy bench --write-config`'s")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--log-format", choices=["text", "json"], help="log lines as text (default) or JSON objects")
    serve.add_argument("--insecure-no-auth", action="store_true",
                       help="allow listening beyond loopback with no API key (never on a hospital network)")
    serve.set_defaults(func=cmd_serve)
    models = sub.add_parser("models", help="the model catalog")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    listing = models_sub.add_parser("list", help="list the catalog and check each file's sha256")
    listing.add_argument("--config", action="append")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_models)
    from server.cli_models import add_parsers as add_models_parsers

    add_models_parsers(models_sub)  # pull, verify
    events = sub.add_parser("events", help="recent routing decisions and breaker transitions (the journal)")
    events.add_argument("--config", action="append")
    events.add_argument("--limit", type=int, default=50)
    events.add_argument("--kind", choices=["route", "breaker", "drill", "shadow", "admin"])
    events.add_argument("--json", action="store_true")
    events.add_argument("--export", metavar="FILE", help="write a consistent copy of the whole journal (SQLite) to FILE")
    events.set_defaults(func=cmd_events)
    hardware = sub.add_parser("hardware", help="what this machine has, and (--plan) how the models would be placed on it")
    hardware.add_argument("--plan", action="store_true", help="each model's engine settings with the reason for each")
    hardware.add_argument("--config", action="append", help="the config whose models to plan (default: the embedded catalog)")
    hardware.add_argument("--json", action="store_true")
    hardware.set_defaults(func=cmd_hardware)
    from server.cli_drill import add_parser as add_drill

    add_drill(sub)
    from server.cli_bench import add_parser as add_bench

    add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"understudy: config error: {exc}", file=sys.stderr)
        return 2
    except KeyFileError as exc:
        print(f"understudy: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
