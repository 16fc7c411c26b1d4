#!/usr/bin/env bash
# rsdiff's GPU checks in one go, on a GPU host that needs no network once a wheelhouse is there.
#
#   tests/benchmarks/gpu_checks.sh OUT [WHEELS] [DUBAI]
#
# OUT     folder for what comes back: JSON lines, the test log, the label-efficiency report
# WHEELS  a wheelhouse made by `python -m rsdiff.wheelhouse` (see the README's Development
#         section); installed first, with rsdiff itself editable, when given
# DUBAI   the dubai-aerial folder; when given, a GPU-pretrained model (adm128, 128 px tiles) is put
#         to the label-efficiency test with the fair protocol (README: Label efficiency on dubai)
#
# Steps run in order and each says when it ends; one failing does not stop the next. The exit
# status is 0 when every step that applies ended with 0, else 1. Sizes: RSDIFF_GPU_PRETRAIN_STEPS
# (default 4000) and RSDIFF_GPU_WORK (scratch folder, default a temp folder: checkpoints and shards
# stay there, never in OUT). RSDIFF_GPU_BUDGET_S (default: none) bounds the whole run in seconds,
# for a GPU host lent for a fixed time: a step still running when it is spent gets Ctrl-C (pytest
# then prints its failures so far) and the steps after it are not run; each says so.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: tests/benchmarks/gpu_checks.sh OUT [WHEELS] [DUBAI]}
wheels=${2:-}
dubai=${3:-}
work=${RSDIFF_GPU_WORK:-$(mktemp -d)}
steps=${RSDIFF_GPU_PRETRAIN_STEPS:-4000}
budget=${RSDIFF_GPU_BUDGET_S:-}
if ! [[ $budget =~ ^[0-9]*$ ]]; then
    echo "RSDIFF_GPU_BUDGET_S=$budget: give whole seconds (or leave it unset for no bound)" >&2
    exit 2
fi
mkdir -p "$out" "$work"
status=0

step() {  # step NAME COMMAND...: run within what is left of the budget, log to OUT/NAME.log, say how it ended
    local name=$1 t0=$SECONDS bound=()
    shift
    if [ -n "$budget" ]; then
        local left=$((budget - SECONDS))
        if [ "$left" -le 0 ]; then
            echo "$name: not run (RSDIFF_GPU_BUDGET_S=$budget is spent)"
            status=1
            return 1
        fi
        bound=(timeout -s INT -k 15 "$left")
    fi
    "${bound[@]}" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    local why=""
    [ -n "$budget" ] && [ $((budget - SECONDS)) -le 0 ] && [ $rc -ne 0 ] && why=", stopped at the budget"
    echo "$name: exit $rc after $((SECONDS - t0)) s$why (log: $out/$name.log)"
    [ $rc -eq 0 ] || status=1
    return $rc
}

if [ -n "$wheels" ]; then
    step install python "$wheels"/part_000/install_wheelhouse.py "$wheels"/part_* &&
        step install-rsdiff python -m pip install --no-index --no-deps --no-build-isolation -e . || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/gpu.txt" 2>&1

# Every GPU test, with Ray: NCCL pretraining (bf16, channels_last, compile), exact resume with CUDA
# generators, GPU extraction actors, GPU prediction vs CPU, label efficiency on the GPU.
step test_gpu python -m pytest tests/test_gpu.py -q -ra --tb=short -p no:cacheprovider --durations=10 \
    --junitxml "$out/test_gpu.xml"

# Ray's overhead on the GPU: P1 (Ray Train vs the plain loop) and P3 (Ray Data actor vs in-process).
step ray_gpu sh -c "python tests/benchmarks/bench_ray_gpu.py > '$out/ray_gpu.json'"

# Compiled training: MFU per preset, peak memory vs the estimate, the batch x checkpointing sweep.
step compile sh -c "python tests/benchmarks/bench_compile.py --gpu --batch 0 --steps 50 --sweep 32,64,96 \
    --sweep-levels none,0 --preset configs/pretrain/tiny.yaml,configs/pretrain/adm128.yaml,configs/pretrain/adm256.yaml \
    > '$out/compile.json'"

[ -n "$dubai" ] || exit $status
# A GPU-pretrained dubai model under the fair protocol: train tile_6, val tile_1, test tile_2.
step dubai-ingest python jobs/ingest.py --config configs/ingest/dubai.yaml \
    "inputs=['$dubai/tile_[126]/images/*.jpg']" tile_size=128 shard_max_mb=64 val_fraction=0 \
    "val_scenes=['tile_1-*']" "test_scenes=['tile_2-*']" "output=$work/shards" &&
    step dubai-pretrain python jobs/pretrain.py --config configs/pretrain/adm128.yaml \
        "data.shards=$work/shards" data.batch_size=64 data.num_workers=6 "optim.max_steps=$steps" \
        optim.warmup_steps=200 "checkpoint.every_steps=$steps" "run.storage=$work/ray" run.name=dubai-gpu \
        "tracking.uri=sqlite:///$work/mlflow.db" tracking.log_every=100 "tracking.sample_every=$steps" &&
    step dubai-extract python jobs/extract.py --config configs/extract/tiny.yaml \
        "checkpoint=$(ls -d "$work"/ray/dubai-gpu/checkpoint_0* | tail -1)" "shards=$work/shards" \
        'timesteps=[50]' num_gpus=1 batch_size=32 "output=$work/features" &&
    step dubai-label-efficiency python jobs/label_efficiency.py "features=$work/features" num_gpus=1 \
        val_budget=k 'ks=[1,5]' draws=5 'methods=[finetune,finetune_random,dense_decoder,scratch_unet]' \
        overlap=16 finetune.steps=240 finetune.eval_every=40 finetune.patience=3 \
        finetune.lr_schedule=cosine finetune.class_weighting=balanced \
        dense_decoder.steps=300 dense_decoder.eval_every=50 dense_decoder.patience=3 \
        dense_decoder.lr_schedule=cosine dense_decoder.class_weighting=balanced \
        unet.steps=600 unet.eval_every=50 unet.patience=4 unet.lr_schedule=cosine \
        unet.class_weighting=balanced "tracking.uri=sqlite:///$work/mlflow.db" "output=$work/le" &&
    cp "$work"/le/results.json "$work"/le/table.md "$work"/le/label_efficiency.png "$out"/
exit $status
