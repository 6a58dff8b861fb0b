"""``understudy models pull`` and ``understudy models verify``.

    understudy models pull URL --id ID --kind chat --sha256 HEX [--dest DIR] [--config FILE] [--replace]
    understudy models pull URL --id ID --kind embedding --sha256 HEX --tokenizer URL --tokenizer-sha256 HEX
    understudy models verify [--config FILE] [--json]

``pull`` downloads (``server.models_pull.fetch``: resume, sha256 verified before the file gets its
name), checks the file (GGUF: header, architecture known to this llama.cpp, vocabulary loads;
ONNX: loads, takes input_ids/attention_mask; tokenizer.json loads), then writes the
``[models.<id>]`` table to the pulled models' catalog (``<state_dir>/models.toml``, or
``[server] models_file``), which ``understudy serve`` merges with its config. Files go to
``<dest>/<id>/`` (``<state_dir>/models/<id>/`` by default). Before anything is downloaded the
new table is merged with the config exactly as ``serve`` will merge it: a conflict is reported
then, not at the next start.

Exit status: 0 done; 1 the pull failed (download, hash, file check) or ``verify`` found a missing
or corrupt file; 2 a configuration or usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any


_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HEX = re.compile(r"[0-9a-fA-F]{64}")
_FILE_KEYS = ("kind", "format", "path", "sha256", "tokenizer", "tokenizer_sha256")


def add_parsers(models_sub: Any) -> None:
    pull = models_sub.add_parser(
        "pull", help="download a model file (resumable), verify its sha256 and add it to the catalog",
        description="Download a GGUF chat model or an ONNX embedding model (with its tokenizer.json) from an http(s) "
                    "mirror or a file:// URL, resuming an interrupted download; verify its sha256 before it gets its "
                    "name; check that this llama.cpp / onnxruntime can load it; add [models.ID] to the pulled models' "
                    "catalog (<state_dir>/models.toml) that `understudy serve` reads beside its config.")
    pull.add_argument("url", help="http://, https:// or file:// URL (or a local path) of the model file")
    pull.add_argument("--id", dest="model_id", required=True, help="the model id clients will ask for")
    pull.add_argument("--kind", required=True, choices=["chat", "embedding"],
                      help="chat: a GGUF file for llama.cpp; embedding: an ONNX file (needs --tokenizer)")
    pull.add_argument("--sha256", required=True, help="the file's sha256 (64 hex characters), from the model's publisher")
    pull.add_argument("--tokenizer", metavar="URL", help="embedding models: the tokenizer.json's URL")
    pull.add_argument("--tokenizer-sha256", metavar="HEX", help="embedding models: the tokenizer.json's sha256")
    pull.add_argument("--dest", metavar="DIR", help="where files go, in DIR/<id>/ (default: <state_dir>/models)")
    pull.add_argument("--config", action="append", help="the config whose state_dir / models_file to use (as for serve)")
    pull.add_argument("--replace", action="store_true", help="replace the catalog's entry of an id pulled before")
    pull.add_argument("--retries", type=int, default=3, help="resume an interrupted download this many times (default 3)")
    pull.add_argument("--no-progress", action="store_true", help="no progress bar (it is shown on a terminal's stderr)")
    pull.set_defaults(func=cmd_pull)
    verify = models_sub.add_parser("verify", help="re-hash every model file of the catalog (config + pulled models)")
    verify.add_argument("--config", action="append")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=cmd_verify)


def _usage(message: str) -> int:
    print(f"understudy models pull: {message}", file=sys.stderr)
    return 2


def cmd_pull(args: argparse.Namespace) -> int:
    from models.catalog import default_catalog
    from server.config import catalog_file, config_data, parse_config, read_catalog, state_dir_of, with_catalog
    from server import models_pull as mp

    model_id, kind = args.model_id, args.kind
    if not _ID.fullmatch(model_id):
        return _usage(f"--id {model_id!r}: letters, digits, '.', '_' and '-' only (starting with a letter or digit)")
    if not _HEX.fullmatch(args.sha256):
        return _usage("--sha256 must be 64 hexadecimal characters (`sha256sum FILE` gives it)")
    if kind == "embedding":
        if not args.tokenizer or not args.tokenizer_sha256:
            return _usage("--kind embedding needs --tokenizer URL and --tokenizer-sha256 HEX (the model's tokenizer.json)")
        if not _HEX.fullmatch(args.tokenizer_sha256):
            return _usage("--tokenizer-sha256 must be 64 hexadecimal characters")
    elif args.tokenizer or args.tokenizer_sha256:
        return _usage("--tokenizer is for --kind embedding (a GGUF chat model carries its own vocabulary)")
    if args.retries < 0:
        return _usage("--retries must be 0 or more")
    for url in (args.url, args.tokenizer):
        if url:
            try:
                mp.local_source(url)
            except mp.PullError as exc:
                return _usage(str(exc))

    paths = [Path(p) for p in args.config] if args.config else None
    data, base, name = config_data(paths)
    catalog = catalog_file(data, base)
    current = read_catalog(catalog)
    server_table = data.get("server", {})
    embedded = {s.id for s in default_catalog()} if not isinstance(server_table, dict) or \
        server_table.get("embedded_models", True) is not False else set()
    if model_id in embedded:
        return _usage(f"{model_id!r} is an embedded model's id; pull it under another id")

    dest_dir = (Path(args.dest).expanduser().resolve() if args.dest else state_dir_of(data, base) / "models") / model_id
    if kind == "chat":
        model_path = dest_dir / mp.file_name(args.url, f"{model_id}.gguf")
        entry: dict[str, Any] = {"kind": "chat", "format": "gguf", "path": str(model_path), "sha256": args.sha256.lower()}
    else:
        model_path = dest_dir / mp.file_name(args.url, "model.onnx")
        tok_name = mp.file_name(args.tokenizer, "tokenizer.json")
        tok_path = dest_dir / (tok_name if tok_name != model_path.name else "tokenizer.json")
        entry = {"kind": "embedding", "format": "onnx", "path": str(model_path), "sha256": args.sha256.lower(),
                 "tokenizer": str(tok_path), "tokenizer_sha256": args.tokenizer_sha256.lower()}
    old = current.get(model_id)
    if old is not None:
        same = all(old.get(k) == entry.get(k) for k in _FILE_KEYS)
        if not same and not args.replace:
            was = ", ".join(f"{k} = {old[k]!r}" for k in ("kind", "path", "sha256") if k in old)
            return _usage(f"{model_id!r} is already in {catalog} ({was}); pass --replace to replace it, or choose another --id")
        if old.get("kind") == kind:  # keep the engine settings someone added by hand
            entry = {**entry, **{k: v for k, v in old.items() if k not in _FILE_KEYS}}
    # The table as `serve` will see it: a conflict with the config is reported now, before any download.
    parse_config(with_catalog(data, name, catalog, {**current, model_id: entry}), base)

    progress = sys.stderr.isatty() and not args.no_progress
    started = time.monotonic()
    try:
        with mp.locked(dest_dir.parent / f".{model_id}.pull.lock", f"a pull of {model_id!r}", wait=False):
            files = [(args.url, model_path, args.sha256, mp.gguf_head if kind == "chat" else mp.onnx_head,
                      mp.check_gguf if kind == "chat" else mp.check_onnx)]
            if kind == "embedding":
                files.append((args.tokenizer, tok_path, args.tokenizer_sha256, mp.tokenizer_head, mp.check_tokenizer))
            got = []
            for url, dest, sha, head, check in files:
                mp.say(f"pulling {mp.redact(url)} -> {dest}")
                got.append(mp.fetch(url, dest, sha, head_check=head, check=check, retries=args.retries, progress=progress))
                _report(got[-1])
            comment = [f"# pulled from {mp.redact(args.url)}" + (f" (tokenizer: {mp.redact(args.tokenizer)})" if args.tokenizer else ""),
                       f"# on {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} by `understudy models pull`"]
            mp.update_catalog(catalog, model_id, entry, comment)
    except mp.PullError as exc:
        with contextlib.suppress(OSError):
            dest_dir.rmdir()  # only when empty: a resumable partial stays
        print(f"understudy: pull failed: {exc}", file=sys.stderr)
        return 1
    details = got[0].details
    what = (f"{details.get('architecture')}, vocabulary {details.get('n_vocab')}, trained context {details.get('n_ctx_train')}"
            if kind == "chat" else f"{details.get('dimensions') or '?'} dimensions, tokenizer vocabulary "
                                   f"{got[1].details.get('vocabulary')}")
    print(f"pulled {kind} model {model_id!r} ({what}) in {time.monotonic() - started:.1f} s")
    for g in got:
        print(f"  {g.path}  ({g.size} bytes, sha256 {g.sha256} verified)")
    print(f"  catalog: {catalog} [models.{mp.toml_key(model_id)}]")
    if kind == "chat" and not details.get("chat_template"):
        print("  note: the file has no chat template; Understudy will format chats as ChatML")
    print("`understudy serve` (with the same config) serves it; a running server reads the catalog at its next start.")
    return 0


def _report(got: Any) -> None:
    from server.models_pull import mb, say

    if got.reused:
        say(f"{got.path.name} is already here with the right sha256 ({mb(got.size)}); nothing downloaded")
        return
    rate = got.received / got.seconds / 1e6 if got.seconds > 0 else 0.0
    extra = f", resumed at {', '.join(mb(o) for o in got.resumed_from)}" if got.resumed_from else ""
    extra += f", restarted from zero {len(got.restarts)}x ({'; '.join(got.restarts)})" if got.restarts else ""
    say(f"{got.path.name}: {mb(got.size)}, {mb(got.received)} transferred in {got.seconds:.1f} s ({rate:.0f} MB/s{extra}); "
        "sha256 verified")


def cmd_verify(args: argparse.Namespace) -> int:
    from models.integrity import check_file
    from server.config import load_config

    config = load_config([Path(p) for p in args.config] if args.config else None)
    files: list[tuple[str, str, Path | None, str]] = []
    for spec in config.models:
        what = "examples" if spec.classifier is not None else "model"
        files.append((spec.id, what, spec.path, spec.sha256))
        if spec.tokenizer_path is not None:
            files.append((spec.id, "tokenizer", spec.tokenizer_path, spec.tokenizer_sha256 or ""))
    width = max(len(f[0]) for f in files)
    out = []
    for model_id, what, path, sha in files:
        result = check_file(path, sha, f"{what} of '{model_id}'")
        row = {"id": model_id, "file": what, "state": result.check.value, "path": str(path) if path else None,
               "sha256": sha, "problem": result.message or None}
        out.append(row)
        if not args.json:
            print(f"{row['state']:<8} {model_id:<{width}}  {what:<9}  {row['path'] or '-'}", flush=True)
    bad = [r for r in out if r["state"] != "ok"]
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for r in bad:
            print(f"\n{r['problem']}")
        print(f"\n{len(out)} files: {len(out) - len(bad)} ok, {sum(r['state'] == 'missing' for r in bad)} missing, "
              f"{sum(r['state'] == 'corrupt' for r in bad)} corrupt")
    return 1 if bad else 0

