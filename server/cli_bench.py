"""``understudy bench``: the hardware benchmark, ``scripts/bench.py``, from the CLI.

    understudy bench --quick                                  # about 4-5 minutes on 2 cores
    understudy bench --config understudy.toml --write-config tuned.toml

The benchmark lives in the source tree (``scripts/bench.py``, next to the serving benchmark it
reuses); its options are defined there once and registered here from that file. Without the
source tree the subcommand says where it looked and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import server

SCRIPT = Path(server.__file__).resolve().parent.parent / "scripts" / "bench.py"
_HELP = "measure this box: engine sweeps, serving, capacity per covered workload; write a tuned config"


def _load() -> ModuleType | None:
    if not SCRIPT.is_file():
        return None
    spec = importlib.util.spec_from_file_location("understudy_bench_script", SCRIPT)
    if spec is None or spec.loader is None:
        return None
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


def add_parser(sub: Any) -> None:
    bench = _load()
    if bench is None:
        # '+' as the only prefix: every '-...' word is a plain argument, so the user gets this
        # message rather than argparse's "unrecognized arguments".
        parser = sub.add_parser("bench", help=_HELP, add_help=False, prefix_chars="+")
        parser.add_argument("ignored", nargs="*")
        parser.set_defaults(func=_missing)
        return
    parser = sub.add_parser("bench", help=_HELP, description=bench.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(parser)
    parser.set_defaults(func=lambda args: _run(bench, args))


def _run(bench: ModuleType, args: argparse.Namespace) -> int:
    words = sys.argv[1:]
    command = " ".join(shlex.quote(w) for w in ["understudy", *words])
    return int(bench.run(args, command))


def _missing(args: argparse.Namespace) -> int:
    print(f"understudy bench: the benchmark script is not here: {SCRIPT} (it ships with the source tree; "
          "run it from a checkout of Understudy)", file=sys.stderr)
    return 2
