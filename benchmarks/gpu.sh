#!/usr/bin/env bash
# benchmarks/gpu.py on a lent GPU machine (see its docstring), from the repository root.
#
#   bash benchmarks/gpu.sh --prepare   here, with network: the wheels the device machine lacks into .whl/
#                                      (transformers and regex at requirements.lock's versions; about 14 MB)
#   bash benchmarks/gpu.sh [ARGS]      there: device `run` with command "bash benchmarks/gpu.sh",
#                                      carry [".whl"], timeout_s 540; ARGS go to gpu.py
#
# The device machine has no network: its python3 holds torch and triton (and transformers 5.17, older
# than the model's >=5.24); the carried wheels are installed into /tmp/site with pip --no-index. What is
# still missing is reported in the JSON line (`missing`, `errors`), which is also written to $OUT/gpu.json.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}

if [ "${1:-}" = "--prepare" ]; then
    # .whl/ is in .gitignore: never committed; `run` still carries it when carry names it
    mkdir -p "$WHEELS"
    for pkg in transformers regex; do
        pin=$(grep -i "^$pkg==" requirements.lock | head -1)
        [ -n "$pin" ] || { echo "[gpu.sh] $pkg is not in requirements.lock" >&2; exit 1; }
        "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$WHEELS" "$pin" || exit 1
    done
    ls -l "$WHEELS"
    exit 0
fi

export PYTHONUNBUFFERED=1
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "[gpu.sh] installing $WHEELS/*.whl failed; going on with what $PY has" >&2
    fi
else
    echo "[gpu.sh] no $WHEELS/*.whl carried: the train section needs transformers>=5.24 (bash benchmarks/gpu.sh --prepare)" >&2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv >&2 || true
OUT_DIR=${OUT:-/tmp}
timeout -k 10 470 "$PY" benchmarks/gpu.py --require-gpu --out "$OUT_DIR/gpu.json" "$@"
rc=$?
[ $rc -eq 124 ] && echo "[gpu.sh] gpu.py passed 470 s; partial results in $OUT_DIR/gpu.json" >&2
exit $rc
