#!/usr/bin/env bash
# The depth-scaling study on Fashion-MNIST (issue 17), spiking MLP and VGG: run it (or rerun it after a
# stop: every sweep resumes) from the repository root. Data: with DATA unset, Debian's package
# (apt-get install dataset-fashion-mnist, /usr/share/datasets/fashion-mnist); with DATA=DIR, the four
# IDX files in DIR (or its raw/, FashionMNIST/raw/ or fashion-mnist/ subfolder), and only there.
# Each sweep takes ~20-40 min on 2 cores.
# lyap_eps 0.01: the default 1e-4 spread over 256-4096 membranes is below what float32 resolves.
set -euo pipefail
# --data_dir only when DATA is set: without it the loader reads Debian's copy
DATA_ARGS=()
if [[ -n "${DATA:-}" ]]; then DATA_ARGS=(--data_dir "$DATA"); fi
COMMON=(bench depth-scaling --dataset fashion_mnist ${DATA_ARGS[@]+"${DATA_ARGS[@]}"} --train_subset 6000 --test_subset 2000
        --depths 2 4 8 16 32 --seeds 0 1 2 --epochs 8 --width 128 --T 4 --batch_size 128
        --lyap_eps 0.01 --lyap_fraction 0.25 --jobs 2 --no-progress --resume)
# the seeds' setting (Xavier init, surrogate slope 25), without and with the Lyapunov penalty
.venv/bin/stablespike "${COMMON[@]}" --inits default --surrogate_slope 25 --out_dir runs/fashion_mlp_seed
# the cure (calibrated init + slope 1) and the published alternative (fluctuation-driven init), each
# without and with the penalty
.venv/bin/stablespike "${COMMON[@]}" --inits calibrated fluctuation --surrogate_slope 1 --out_dir runs/fashion_mlp_cure
# spiking VGG (batch norm), depths 4 8 12 (seed 002's depth-to-stages mapping), 16 base channels
VGG=(bench depth-scaling --dataset fashion_mnist ${DATA_ARGS[@]+"${DATA_ARGS[@]}"} --model vgg --width 16
     --train_subset 3000 --test_subset 1000 --depths 4 8 12 --seeds 0 1 2 --epochs 5 --T 4
     --batch_size 64 --lyap_eps 0.01 --lyap_fraction 0.25 --jobs 2 --no-progress --resume)
.venv/bin/stablespike "${VGG[@]}" --inits default --surrogate_slope 25 --out_dir runs/fashion_vgg_seed
.venv/bin/stablespike "${VGG[@]}" --inits calibrated --surrogate_slope 1 --out_dir runs/fashion_vgg_cure
