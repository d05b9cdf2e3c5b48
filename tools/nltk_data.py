"""Install NLTK's punkt_tab (English) for IFEval's checkers, from PyPI only.

    python tools/nltk_data.py [TARGET]      # default: <sys.prefix>/nltk_data (on NLTK's search path)

lm-eval's IFEval counts sentences with nltk.sent_tokenize, which needs NLTK's punkt_tab data;
lm-eval calls nltk.download when it is missing, which fails without internet (a trainer pod on
an air-gapped cluster, CI, this project's machines). No NLTK package on PyPI carries the data,
but the llama-index-core wheel ships NLTK's own punkt_tab files (llama_index/core/_static/
nltk_cache/); this downloads that one pinned wheel (pip, no dependencies, hash-checked) and
extracts only tokenizers/punkt_tab/english and the README (the models' provenance). Idempotent.
Used by scripts/setup (the venv) and trainer_image/Dockerfile (the image).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llama_index_core-0.14.25-py3-none-any.whl"
REQUIREMENT = "llama-index-core==0.14.25"
SHA256 = "caa7d9c5ac9b13dc33400cf8d5e92e689b6d1e4497eb9bfa50d6f52ca2eb22a1"
INSIDE = "llama_index/core/_static/nltk_cache/"
WANTED = ("tokenizers/punkt_tab/english/", "tokenizers/punkt_tab/README")
FILES = ("abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt")


def installed(target: Path) -> bool:
    return all((target / "tokenizers/punkt_tab/english" / f).is_file() for f in FILES)


def install(target: Path) -> None:
    if installed(target):
        print(f"punkt_tab (english) already in {target}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--dest", tmp, REQUIREMENT], check=True)
        wheel = Path(tmp) / WHEEL
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != SHA256:
            raise SystemExit(f"{WHEEL}: sha256 {digest}, expected {SHA256}; not extracting")
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                rel = name[len(INSIDE):]
                if name.startswith(INSIDE) and rel.startswith(WANTED) and not name.endswith("/"):
                    dest = target / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(z.read(name))
    if not installed(target):
        raise SystemExit(f"{WHEEL} did not hold {WANTED[0]}{FILES}")
    print(f"punkt_tab (english) installed in {target}")


if __name__ == "__main__":
    install(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(sys.prefix) / "nltk_data")
