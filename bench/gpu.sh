#!/usr/bin/env bash
# dpolab's DPO throughput comparison on a CUDA machine: TRL DPOTrainer (trl-best-ckpt-off: precomputed reference, no checkpointing) vs dpolab with FlexAttention
# (`dpolab`: attention auto picks flex on CUDA; `dpolab-warm`: the same, reference cache warm) vs dpolab forcing the
# dense-mask SDPA path (`dpolab-sdpa`); bf16 where native (sm80+: both trainers take it), bench/dpo_vs_trl.py.
#
# Use with this workplace's device tool (a GPU machine with no internet, whose python3 has torch/transformers but
# not pydantic, trl, datasets; the working tree that travels is at most 64 MiB):
#   1. here, in the repo root:   bash bench/gpu.sh pack
#      builds the git-ignored folder .gpu/ (listed in .git/info/exclude, never committed): the model's config and
#      tokenizer, the HH pairs, and the wheels the GPU image lacks; prints its size (~20 MiB).
#   2. the device tool's run:    carry [".gpu"], command `bash bench/gpu.sh run`, timeout_s ~540
#      (it installs the wheels into /tmp/site, prints nvidia-smi and the versions, runs the benchmark, and leaves
#      gpu_bench.log and dpo_vs_trl_gpu.json in $OUT; if the benchmark fails or times out, the configurations that
#      finished come back as partial_<name>.json instead).
#   3. commit the result under bench/results/ as dpo_vs_trl_gpu.json (bench/results/dpo_vs_trl.json stays the CPU
#      run's).
# Knobs for a rerun without editing (environment of `run`): GPU_BENCH_LAYERS (30), GPU_BENCH_PAIRS (256),
# GPU_BENCH_STEPS (32), GPU_BENCH_ONLY ("trl-best-ckpt-off dpolab dpolab-sdpa dpolab-warm"), GPU_BENCH_TIMEOUT (460 s, the
# benchmark alone; the wheel install and the import check before it take ~30 s).
#
# Random weights: the converted SmolLM2-135M-Instruct weights (538 MB) cannot travel (64 MiB limit) and the machine
# cannot download them, so the benchmark builds the model from its config.json with random weights (seeded) and the
# real tokenizer (`--model .gpu/model --random-weights`). The cost of a step does not depend on the weights' values
# (same shapes, same kernels, same data, same token counts), so pairs/s, MFU and memory compare; the losses are not
# comparable to the CPU bench's (bench/results/dpo_vs_trl.json), only across this run's configurations.
#
# Size (why 30 layers, 256 pairs, 32 steps): the full model as on CPU; 32 steps x 8 pairs = each of the 256 pairs
# trained once. On an H100 a step of this 135M model takes well under a second, so the run is dominated by fixed
# costs per configuration (a subprocess importing torch/transformers, loading the model, TRL's tokenization and
# reference precompute, dpolab's reference cache, Triton/inductor compiling flex's forward and backward), ~1 min
# each, plus ~1 min of setup: ~5 min in all, inside the 540 s call with margin. 32 steps rather than 8 so the first
# step's warm-up (CUDA/Triton kernels, flex compiles) weighs a quarter as much in pairs/s (= pairs / train_runtime);
# the steady step time (steps after the first) is recorded beside it.
#
# bench/flex_attention.py is not run here: it is CPU-only as written (model, batches and its matmul peak stay on the
# CPU; it asks flex_unsupported(model, "cpu")) and hard-codes the embedded model (embedded_model_dir()) and the HH
# file under ../shared, neither of which exists on the GPU machine; it has no --model/--data options.
#
# Wheels carried (`pack` pins each to the version in .venv, i.e. the CPU bench's; never torch/nvidia/triton):
#   always: pydantic, pydantic-core, annotated-types, typing-inspection (dpolab.config: not in the image);
#           trl, datasets, dill, multiprocess (TRL: not in the image; xxhash, fsspec, pyarrow, pandas are);
#           transformers, peft (the image has transformers 5.17, dpolab requires >=5.20 and the model's config.json
#           was written by 5.24 (rope_parameters); peft to match that transformers)
#   min/:   typing-extensions, regex: installed only where the image's own version is older (pydantic and
#           pydantic-core need typing-extensions>=4.16.0, transformers 5.24 checks regex>=2025.10.22 at import).
# Requires-Dist checked (extras left out) for the versions of 2026-11 (.venv: pydantic 2.14.4, pydantic-core
# 2.50.5, annotated-types 0.8.0, typing-inspection 0.4.5, trl 1.16.0, datasets 5.2.0, dill 0.4.1, multiprocess
# 0.70.19, transformers 5.24.0, peft 0.21.2, typing-extensions 4.16.0, regex 2026.11.19):
#   pydantic: annotated-types>=0.6 (carried), pydantic-core==2.50.5 (carried), typing-extensions>=4.16 (min/),
#     typing-inspection>=0.4.4 (carried); pydantic-core, typing-inspection: typing-extensions (min/);
#     annotated-types, dill, regex, typing-extensions: none
#   trl: accelerate>=1.10.1 (image 1.15.0), datasets>=4.7 (carried), huggingface_hub>=0.34 (image 1.33.0), jinja2,
#     numpy, packaging, pandas, psutil, pyarrow>=21, pyyaml (image), transformers>=4.56.2 (carried)
#   datasets: filelock, numpy, pyarrow>=24, dill<0.4.2 (carried), pandas, tqdm, xxhash, multiprocess<0.70.20
#     (carried), fsspec>=2023.1,<=2026.9.0, huggingface-hub>=1.31,<3 (image 1.33.0), packaging, pyyaml (image; the
#     image's pyarrow and fsspec versions are not known here: `run` prints them; TRL only uses Dataset.from_list)
#   multiprocess: dill>=0.4.1 (carried)
#   transformers: huggingface-hub>=1.31,<3 (image 1.33.0), numpy, packaging, pyyaml, regex>=2025.10.22 (min/),
#     tokenizers>=0.23.1,<0.24 (image 0.23.2), typer, safetensors>=0.8.0 (image 0.8.0), tqdm (image)
#   peft: numpy, packaging, psutil, pyyaml, torch, transformers (carried), tqdm, accelerate, safetensors,
#     huggingface_hub (image)
# huggingface_hub is NOT carried: .venv's 2.4.0 needs httpx2 (not in the image); the image's 1.33.0 satisfies all.
# `pack` prints every wheel's Requires-Dist again, to re-check after a version bump.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
GPU=.gpu
ALWAYS=(pydantic pydantic-core annotated-types typing-inspection trl datasets dill multiprocess transformers peft)
MIN=(typing-extensions regex)
LIMIT_MIB=64

die() { echo "gpu.sh: $*" >&2; exit 1; }

pins() {  # NAME==VERSION of each name as installed in .venv
    .venv/bin/python - "$@" <<'EOF'
import importlib.metadata as md, sys
print(" ".join(f"{n}=={md.version(n)}" for n in sys.argv[1:]))
EOF
}

download() {  # download DIR SPEC...: cp312 manylinux x86-64 wheels, no dependencies (the device README's recipe)
    local dir=$1; shift
    "${PIP_PY:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" "$@"
}

pack() {
    [ -x .venv/bin/python ] || die "no .venv here: pack runs in the dev checkout"
    local exclude model_dir data=../shared/data/hh-rlhf/harmless-base-test.2000.jsonl.gz
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qxF '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"
    git check-ignore -q "$GPU/x" || die "$GPU is not ignored by git"

    rm -rf "$GPU"
    mkdir -p "$GPU/model" "$GPU/wheels/min"
    model_dir=$(.venv/bin/python -c "from dpolab.models import embedded_model_dir; print(embedded_model_dir())")
    for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
        cp "$model_dir/$f" "$GPU/model/" || die "$model_dir/$f missing (run dpolab once to convert the model)"
    done
    cp "$data" "$GPU/hh.jsonl.gz" || die "$data missing"

    local always min
    read -ra always <<<"$(pins "${ALWAYS[@]}")"
    read -ra min <<<"$(pins "${MIN[@]}")"
    echo "wheels: ${always[*]} | only where older there: ${min[*]}"
    download "$GPU/wheels" "${always[@]}"
    download "$GPU/wheels/min" "${min[@]}"
    [ "$(ls "$GPU"/wheels/*.whl | wc -l)" -eq "${#always[@]}" ] || die "expected ${#always[@]} wheels in $GPU/wheels"
    [ "$(ls "$GPU"/wheels/min/*.whl | wc -l)" -eq "${#min[@]}" ] || die "expected ${#min[@]} wheels in $GPU/wheels/min"
    if ls "$GPU"/wheels "$GPU"/wheels/min | grep -iE '^(torch|nvidia|triton)'; then die "a torch/nvidia wheel"; fi

    local w
    for w in "$GPU"/wheels/*.whl "$GPU"/wheels/min/*.whl; do
        echo "== ${w#$GPU/wheels/}"
        unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/   /' || true
    done

    local bytes tree
    bytes=$(du -sb "$GPU" | cut -f1)
    tree=$( (git ls-files -z; git ls-files -z -o --exclude-standard) | xargs -0 stat -c %s 2>/dev/null |
        awk '{s += $1} END {print s + 0}')
    du -sh "$GPU"/*
    echo "$GPU: $((bytes / 1048576)) MiB; with the rest of the tree that travels: $(((bytes + tree) / 1048576)) MiB" \
        "(limit $LIMIT_MIB MiB)"
    [ $((bytes + tree)) -lt $((LIMIT_MIB * 1048576)) ] || die "over the device tool's $LIMIT_MIB MiB"
}

bench() {  # run's body; its output goes to the log
    local layers=${GPU_BENCH_LAYERS:-30} pairs=${GPU_BENCH_PAIRS:-256} steps=${GPU_BENCH_STEPS:-32}
    local only=${GPU_BENCH_ONLY:-trl-best-ckpt-off dpolab dpolab-sdpa dpolab-warm} limit=${GPU_BENCH_TIMEOUT:-460}
    local work=/tmp/dpolab-gpu-work result=bench/results/dpo_vs_trl.json site=/tmp/site
    [ -d "$GPU/wheels" ] && [ -f "$GPU/model/config.json" ] && [ -f "$GPU/hh.jsonl.gz" ] ||
        { echo "no $GPU here: run 'bash bench/gpu.sh pack' first and carry [\".gpu\"]"; return 1; }
    date -u
    nvidia-smi || { echo "nvidia-smi failed"; return 1; }

    local wheels=("$GPU"/wheels/*.whl) older
    older=$(python3 - "$GPU"/wheels/min/*.whl <<'EOF'
import importlib.metadata as md, pathlib, sys
from packaging.version import Version
for wheel in sys.argv[1:]:
    name, version = pathlib.Path(wheel).name.split("-")[:2]
    try:
        have = Version(md.version(name))
    except md.PackageNotFoundError:
        have = None
    print(f"{name}: image {have}, carried {version}", file=sys.stderr)
    if have is None or have < Version(version):
        print(wheel)
EOF
    ) || return 1
    [ -z "$older" ] || mapfile -t -O "${#wheels[@]}" wheels <<<"$older"
    rm -rf "$site"
    echo "installing ${#wheels[@]} wheels into $site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "${wheels[@]}" || { echo "pip install failed"; return 1; }

    export PYTHONPATH=$PWD/src:$site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1  # no internet there: never try it
    python3 - <<'EOF' || { echo "import check failed"; return 1; }
import importlib.metadata as md, sys
import torch, transformers, trl, datasets, pydantic, peft  # noqa: F401
from trl import DPOConfig, DPOTrainer  # noqa: F401
import dpolab.engine.train, dpolab.engine.flex, dpolab.data.prepare  # noqa: F401
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "transformers", "trl", "datasets", "accelerate", "peft", "pydantic", "tokenizers",
             "safetensors", "huggingface_hub", "pyarrow", "fsspec", "regex", "typing_extensions", "triton"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} -")
print("cuda", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "",
      torch.cuda.get_device_capability(0) if torch.cuda.is_available() else "")
assert torch.cuda.is_available(), "no CUDA device"
EOF

    rm -rf "$work"
    local started=$SECONDS rc=0
    # shellcheck disable=SC2086  # $only: one word per configuration
    timeout --kill-after=15 "$limit" python3 bench/dpo_vs_trl.py --model "$GPU/model" --random-weights \
        --data "$GPU/hh.jsonl.gz" --layers "$layers" --pairs "$pairs" --steps "$steps" --work "$work" \
        --only $only || rc=$?
    echo "benchmark: exit $rc after $((SECONDS - started)) s"
    # The tracked bench/results/dpo_vs_trl.json (the CPU run) travels too: take it only if this run rewrote it.
    if [ "$rc" -eq 0 ] && python3 -c "import json, sys; sys.exit('gpu' not in json.load(open('$result'))['machine'])"
    then
        cp "$result" "$OUT/dpo_vs_trl_gpu.json"
        echo "-> \$OUT/dpo_vs_trl_gpu.json"
        return 0
    fi
    local f
    for f in "$work"/*.json; do  # each finished configuration's own result (at most 4 + the log: within 8 files)
        [ -f "$f" ] && cp "$f" "$OUT/partial_$(basename "$f")" && echo "-> \$OUT/partial_$(basename "$f")"
    done
    [ "$rc" -ne 0 ] || rc=1
    return "$rc"
}

run() {
    [ -n "${OUT:-}" ] && [ -d "$OUT" ] || die "run mode expects \$OUT (the device tool's output folder)"
    set +e
    bench 2>&1 | tee "$OUT/gpu_bench.log"
    local rc=${PIPESTATUS[0]}
    set -e
    echo "gpu.sh run: exit $rc"
    exit "$rc"
}

case "${1:-}" in
    pack) pack ;;
    run) run ;;
    *) die "usage: bash bench/gpu.sh pack   (here)  |  bash bench/gpu.sh run   (on the device machine)" ;;
esac
