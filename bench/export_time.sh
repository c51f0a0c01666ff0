#!/usr/bin/env bash
# Export time of the streamed paths against the whole-model ones, in one script (a fresh process per command):
#   bash bench/export_time.sh CHECKPOINT_DIR [WORKDIR]
# e.g. a bf16 mid-size checkpoint: glm-export tiny --size mid --dtype bfloat16 --out /tmp/ckpt-mid
set -e
C=${1:?checkpoint directory}
W=${2:-$(mktemp -d)}
P=".venv/bin/python -m exporter.cli"
t() { local s=$(date +%s.%N); "$@" > /dev/null 2>&1; local e=$(date +%s.%N); echo "$(echo "$e - $s" | bc)"; }
for r in 1 2; do
  a=$(t $P onnx --model $C --out $W/s-fp32 --overwrite --quiet)
  b=$(t $P onnx --model $C --out $W/m-fp32 --overwrite --quiet --in-memory)
  c=$(t $P onnx --model $C --out $W/s-int4 --precision int4 --overwrite --quiet)
  d=$(t $P quantize --model $W/m-fp32 --out $W/m-int4 --precision int4 --no-eval --overwrite --quiet --in-memory)
  echo "round $r: streamed fp32 $a s, in-memory fp32 $b s, direct int4 $c s, in-memory quantize int4 (from the fp32 bundle) $d s"
done
