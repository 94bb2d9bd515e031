#!/usr/bin/env bash
# 54m MoE-MLA-RoPE on 1 vs 2 GPUs of one host (torchrun, NCCL): strong scaling (same global
# batch 32 x 512) and weak scaling (32 x 512 per GPU). Run on the nvidia-h200-x2 device kind:
#   bash studies/gpu/ddp_scaling.sh /tmp/ddp
set -u
S=${1:-/tmp/ddp}
mkdir -p "$S"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
ARGS="train --preset 54m --arch moe-mla-rope --optimizer muon --lr 3e-3 --adam-lr 3e-3 --seq-len 512 --steps 120 --warmup 10 --eval-every 120 --eval-batches 16"
run() {  # name, launcher..., batch
  local name=$1 batch=${*: -1}; shift
  local cmd="${*:1:$#-1} $ARGS --batch-size $batch -o $S/$name"
  echo "$name: $cmd" | tee -a "$S/commands.txt"
  $cmd > "$S/$name.txt" 2>&1; echo "$name rc=$?"
  tail -1 "$S/$name/log.jsonl"
}
run gpu1-batch32 python3 -m perseus_edge.cli 32
run gpu2-batch16 python3 -m torch.distributed.run --standalone --nproc_per_node=2 -m perseus_edge.cli 16
run gpu2-batch32 python3 -m torch.distributed.run --standalone --nproc_per_node=2 -m perseus_edge.cli 32
