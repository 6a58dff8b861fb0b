#!/usr/bin/env python3
"""A long fuzzing run of the HTTP API (``make fuzz``): ``tests/test_fuzz.py`` with many more
examples per operation, then what the server answered, per operation.

    python scripts/fuzz.py                      # 8000 examples per operation: about 30 minutes on 2 cores
    python scripts/fuzz.py --examples 2000 --seed 1234
    python scripts/fuzz.py -- -k chat           # arguments after -- go to pytest

A failure prints hypothesis' smallest failing example and how to replay it (``--seed``); the run
stops at the first failing operation only if ``-x`` is passed to pytest. The server's log is in
pytest's temporary folder (``fuzz0/server.log``), printed on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=8000, help="hypothesis examples per operation (default 8000)")
    parser.add_argument("--seed", type=int, help="hypothesis seed, to replay a run")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        env = {**os.environ, "UNDERSTUDY_FUZZ_EXAMPLES": str(args.examples), "UNDERSTUDY_FUZZ_REPORT": str(report)}
        if args.seed is not None:
            env["UNDERSTUDY_FUZZ_SEED"] = str(args.seed)
        # --timeout 0: pyproject's 300 s per test is for the normal suite, not for a long run.
        command = [sys.executable, "-m", "pytest", "tests/test_fuzz.py", "--timeout", "0", "-p", "no:cacheprovider",
                   "-ra", *args.pytest_args]
        print(f"fuzzing with {args.examples} examples per operation: {' '.join(command[1:])}", flush=True)
        status = subprocess.call(command, cwd=ROOT, env=env)
        if report.exists():
            print("\nanswers with the right key, per operation (status and error code):")
            for operation, counts in json.loads(report.read_text()).items():
                total = sum(counts.values())
                print(f"  {operation:30s} {total:6d}  " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return status


if __name__ == "__main__":
    sys.exit(main())
