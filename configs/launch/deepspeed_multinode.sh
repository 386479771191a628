#!/bin/bash
# Multi-node launch with the DeepSpeed launcher and a hostfile (see hostfile.example).
# Run on the first node of the hostfile; DeepSpeed starts the other nodes' ranks over ssh (pdsh by default).
set -euo pipefail
HOSTFILE=${HOSTFILE:-configs/launch/hostfile}
RUN_DIR=${RUN_DIR:-runs/supmae_vit_base_400ep}          # on a shared filesystem
deepspeed --hostfile "$HOSTFILE" --master_port 29500 \
    --module fastsupmae pretrain --config recipes/supmae_vit_base_400ep.yaml \
    train.output_dir="$RUN_DIR" train.resume=auto "$@"
