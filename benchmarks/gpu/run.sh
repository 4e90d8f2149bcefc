#!/usr/bin/env bash
# The GPU validation kit on the GPU machine: bash benchmarks/gpu/run.sh [OUT_DIR] [kit options]
#
# Installs the wheels in .whl/ (made by benchmarks/gpu/prepare_wheels.py) into a private folder,
# then runs every check (python -m benchmarks.gpu.kit) within the total budget, which counts from
# here. OUT_DIR defaults to $OUT. Kit options: --only a,b  --skip c  --budget NAME=S
# --total-budget S  --cpu --tiny (see benchmarks/README.md). Environment: PYTHON (default python3),
# T3_KIT_WHEELS (default .whl), T3_KIT_SITE (default /tmp/t3-kit-site).
set -euo pipefail
started_at=$(date +%s.%N)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=${OUT:-}
if [[ $# -gt 0 && $1 != -* ]]; then
    out=$1
    shift
fi
if [[ -z $out ]]; then
    echo "run.sh: give OUT_DIR or set \$OUT" >&2
    exit 2
fi
mkdir -p "$out"
out=$(cd "$out" && pwd) # absolute: the kit runs from the repository root
python=${PYTHON:-python3}
wheels=${T3_KIT_WHEELS:-$repo/.whl}
site=${T3_KIT_SITE:-/tmp/t3-kit-site}
shopt -s nullglob
found=("$wheels"/*.whl)
if ((${#found[@]})); then
    echo "run.sh: installing ${#found[@]} wheels from $wheels into $site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${found[@]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "run.sh: no wheels in $wheels; using the installed packages"
fi
# The repository first, so that t3 and benchmarks are this working tree's.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
cd "$repo"
exec "$python" -m benchmarks.gpu.kit --out "$out" --started-at "$started_at" "$@"
