#!/usr/bin/env bash
# Everything localtune needs measured on a CUDA GPU, in one call of a lent GPU machine.
#
#   bash benchmarks/gpu_check.sh prepare    HERE, in the checkout that the device tool sends (the
#                                           session's own): wheels into .whl/, the model's config,
#                                           tokenizer and data rows into .gpu-model/, both ignored
#                                           through .git/info/exclude; prints the size that travels
#                                           and the exact device call to make
#   bash benchmarks/gpu_check.sh run [ARGS] THERE (the GPU machine, no network): installs the
#                                           wheels, prints versions, runs benchmarks/gpu_check.py
#                                           ARGS (e.g. --stages 2 to rerun one stage); its log, JSON
#                                           and tables land in $OUT
#   bash benchmarks/gpu_check.sh rehearse   HERE: checks that the wheels install for Python 3.12
#                                           and runs every stage on this CPU at tiny sizes
#                                           (gpu_check.py --rehearse-on-cpu)
#
# prepare needs the project's virtualenv active (it reads the package versions to carry from
# it and converts the built-in model once) and the benchmark data: ../shared/bench/
# varied_lengths.jsonl beside the checkout, or GPU_CHECK_DATA=/path/to/varied_lengths.jsonl.
# benchmarks/README.md ("gpu_check") says what each stage measures.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=512                     # rows of varied_lengths.jsonl that travel (stage 3 trains on them)
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"

prepare() {
    local py=${PYTHON:-python} data=${GPU_CHECK_DATA:-../shared/bench/varied_lengths.jsonl}
    local exclude
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    touch "$exclude"
    for p in /.whl/ /.gpu-model/; do
        grep -qxF "$p" "$exclude" || echo "$p" >>"$exclude"
    done
    rm -rf .whl
    mkdir -p .whl
    local pins
    pins=$("$py" benchmarks/gpu_prepare.py versions)
    echo "gpu_check: carrying $(echo $pins)"
    # shellcheck disable=SC2086
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        $PLATFORMS -d .whl $pins
    "$py" benchmarks/gpu_prepare.py slim-bitsandbytes .whl/bitsandbytes-*.whl
    "$py" benchmarks/gpu_prepare.py model "$data" "$ROWS"
    ls -l .whl .gpu-model .gpu-model/model
    "$py" benchmarks/gpu_prepare.py size .whl .gpu-model
    cat <<'EOF'

gpu_check: ready. The device call (tool `run`), from this checkout:
  command:   bash benchmarks/gpu_check.sh run
  carry:     [".whl", ".gpu-model"]
  timeout_s: 600
To rerun one stage while the machine is still warm (30 s after a call):
  command:   bash benchmarks/gpu_check.sh run --stages 2      (or 1, 3; same carry)
EOF
}

install_wheels() {   # $1: target; the rest: extra pip options
    local target=$1
    shift
    rm -rf "$target"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" \
        "$@" .whl/*.whl
}

run() {
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
    export TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_DISABLE_PROGRESS_BARS=1
    OUT=${OUT:-/tmp/gpu_check_out}
    mkdir -p "$OUT"
    local t0=$SECONDS
    [ -d .whl ] && [ -d .gpu-model ] || { echo "gpu_check: .whl/ or .gpu-model/ is missing: run 'prepare' here and carry both"; exit 1; }
    install_wheels /tmp/site
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the carried versions win over the image's
    echo "gpu_check: wheels installed in $((SECONDS - t0)) s"
    {
        echo "== machine"
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || echo "nvidia-smi failed"
        nproc
        python3 -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda, "| GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none", "| capability", torch.cuda.get_device_capability(0) if torch.cuda.is_available() else "-")' || true
        echo "== packages (pip show; /tmp/site holds the carried ones)"
        python3 -m pip show torch transformers peft trl bitsandbytes accelerate datasets gguf tokenizers \
            huggingface-hub safetensors pyarrow fsspec flash-attn 2>/dev/null | grep -E '^(Name|Version|Location):' | paste - - - || true
        python3 -c 'import bitsandbytes, trl, peft, datasets, transformers; print("imports ok: bitsandbytes", bitsandbytes.__version__, "| trl", trl.__version__, "| peft", peft.__version__, "| datasets", datasets.__version__, "| transformers", transformers.__version__)' \
            || echo "gpu_check: an import FAILED (above); the stages that need it will say so"
    } 2>&1 | tee "$OUT/versions.txt"
    set -o pipefail
    python3 benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
}

rehearse() {
    local py=${PYTHON:-python}
    [ -d .whl ] && [ -d .gpu-model ] || { echo "gpu_check: run 'prepare' first"; exit 1; }
    # the wheels as the GPU's Python 3.12 installs them (one version each, tags that match)
    # shellcheck disable=SC2086
    install_wheels /tmp/gpu_check_site312 --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS
    echo "gpu_check: the wheels install for cp312 manylinux: $(ls /tmp/gpu_check_site312 | grep -c dist-info) packages"
    local out=${OUT:-/tmp/gpu_check_rehearsal}
    rm -rf "$out"
    mkdir -p "$out"
    PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
        PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$py" benchmarks/gpu_check.py --rehearse-on-cpu --out "$out" "$@" \
        2>&1 | tee "$out/gpu_check.log"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    prepare) prepare ;;
    run) run "$@" ;;
    rehearse) rehearse "$@" ;;
    *) sed -n '2,20p' "$0"; exit 2 ;;
esac
