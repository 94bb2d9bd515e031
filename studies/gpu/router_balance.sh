#!/usr/bin/env bash
# Router balancing speed at 54m: the call-6 recipe (Muon lr 3e-3, 350 steps of 32 x 512 tokens)
# with the aux-loss-free bias moving 3e-3 / 1e-2 / 3e-2 per step instead of DeepSeek-V3's 1e-3.
# Three runs share the GPU:   bash studies/gpu/router_balance.sh /tmp/balance
set -u
S=${1:-/tmp/balance}
mkdir -p "$S"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
for rate in 3e-3 1e-2 3e-2; do
  cmd="python3 -m perseus_edge.cli train --preset 54m --arch moe-mla-rope --optimizer muon --lr 0.003 --adam-lr 0.003 --batch-size 32 --seq-len 512 --steps 350 --warmup 17 --eval-every 30 --eval-batches 16 --router-bias-rate $rate -o $S/54m-moe-mla-rope-muon-lr0.003-bias$rate"
  echo "$cmd" >> "$S/commands.txt"
  $cmd > "$S/bias$rate.txt" 2>&1 &
done
wait
for f in "$S"/*/log.jsonl; do echo "$f"; tail -1 "$f"; done
