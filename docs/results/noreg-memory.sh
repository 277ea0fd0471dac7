#!/bin/bash
# REPO: this checkout (with .venv); OLD: a folder holding `git archive 19a7f17 src | tar -x`; MODEL_DIR: the default
# model's folder (`.venv/bin/python -c "from lorakit.models import resolve; print(resolve('default'))"`)
# peak RSS of one side in a fresh process, old code (19a7f17) vs new, without MALLOC_MMAP_THRESHOLD_ (as the 2026-11-23 table)
unset MALLOC_MMAP_THRESHOLD_
W='{"model": "default", "batch": 8, "seq": 128, "prompt_fraction": 0.5, "r": 16, "alpha": 32.0, "targets": "all-linear", "lr": 0.0001, "dtype": "float32", "seed": 0, "threads": 2, "kernels": true, "checkpointing": false, "compile": false, "plain": false, "model_dir": "'"$MODEL_DIR"'"}'
for sc in train-lora train-qlora; do
  for side in ours peer; do
    R="{\"scenario\": \"$sc\", \"side\": \"$side\", \"workload\": $W, \"runs\": 2}"
    echo "new $sc $side $(cd $REPO && OMP_NUM_THREADS=2 .venv/bin/python -m lorakit_bench.memory "$R" 2>/dev/null | tail -1)"
    [ $side = ours ] && echo "old $sc $side $(cd $OLD && PYTHONPATH=$OLD/src OMP_NUM_THREADS=2 $REPO/.venv/bin/python -m lorakit.bench.memory "$R" 2>/dev/null | tail -1)"
  done
done
