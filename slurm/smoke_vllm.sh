#!/usr/bin/env bash
# End-to-end check of the real vLLM engine on a GPU node: quantize a small hub model (RTN W4 g128), export it
# packed (compressed-tensors, vLLM's low-bit kernels) and fake (dense), generate MATH-500 answers with vLLM,
# score them, and check what came back.
#   bash slurm/smoke_vllm.sh                                  # on a GPU node with `pip install -e ".[vllm]"`
#   sbatch --gpus-per-node=1 --time=1:00:00 slurm/smoke_vllm.sh
# Environment: MODEL (default Qwen/Qwen3-0.6B), LIMIT (20), MAX_NEW_TOKENS (4096), OUT (results/smoke_vllm),
# MATH500 (a local math500.jsonl for offline nodes), EXPORTS ("packed fake").
#SBATCH --job-name=rqbench-smoke-vllm
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=01:00:00
#SBATCH --output=rqbench-smoke-vllm-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
MODEL=${MODEL:-Qwen/Qwen3-0.6B}
LIMIT=${LIMIT:-20}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-4096}
OUT=${OUT:-results/smoke_vllm}
EXPORTS=${EXPORTS:-packed fake}
DATA=()
[ -n "${MATH500:-}" ] && DATA=("task.data_files=$MATH500")

# Versions first: a driver older than torch's CUDA build is the usual reason a GPU node "has no GPU".
echo "=== $(hostname): driver, CUDA and torch"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not found"
nvidia-smi | grep -o "CUDA Version: [0-9.]*" || true
python - <<'PY'
import torch
print(f"torch {torch.__version__} built for CUDA {torch.version.cuda}; torch.cuda.is_available() = {torch.cuda.is_available()}")
assert torch.cuda.is_available(), ("torch cannot use a GPU here: on a GPU node, compare the driver's CUDA version "
                                   "above with torch's CUDA build")
import vllm
print(f"vLLM {vllm.__version__}, GPU {torch.cuda.get_device_name(0)}")
PY

for EXPORT in $EXPORTS; do
  echo "=== $MODEL rtn W4 g128 export=$EXPORT, math500 limit=$LIMIT, backend=vllm"
  rqbench progress=false model=hf model.path="$MODEL" method=rtn quant.bits=4 quant.group_size=128 \
    export="$EXPORT" task=math500 task.limit="$LIMIT" "${DATA[@]}" backend=vllm \
    sampling.max_new_tokens="$MAX_NEW_TOKENS" results_dir="$OUT/$EXPORT" run_tag="smoke"
  python - "$OUT/$EXPORT" "$LIMIT" <<'PY'
import json, sys
from pathlib import Path
root, limit = Path(sys.argv[1]), int(sys.argv[2])
[metrics] = list(root.rglob("metrics.json"))
samples = [json.loads(l) for l in (metrics.parent / "samples.jsonl").read_text().splitlines()]
m = json.loads(metrics.read_text())
assert len(samples) == limit, f"{len(samples)} samples, expected {limit}"
assert len({(s["id"], s["sample"]) for s in samples}) == limit, "duplicate samples"
assert all(s["finish_reason"] in ("stop", "length") for s in samples)
assert all(s["n_tokens"] > 0 and s["completion"] for s in samples), "empty completions"
ck = json.loads((Path(m["checkpoint"]["checkpoint"]) / "config.json").read_text())
print(f"checkpoint {m['checkpoint']['checkpoint']} quantization_config: {ck.get('quantization_config', {}).get('format', 'none (dense)')}")
print(f"acc {m['metrics']['acc']:.3f}  truncated {m['metrics']['truncation_rate']:.2f}  "
      f"tokens mean {m['metrics']['tokens_mean']:.0f}  generate {m['seconds'].get('generate', 0):.1f}s")
assert m["metrics"]["acc"] > 0, "no correct answer at all: the engine or the checkpoint is broken"
print("OK")
PY
done
echo "vLLM smoke test passed: $OUT"
