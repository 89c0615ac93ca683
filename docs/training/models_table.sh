#!/usr/bin/env bash
# Regenerates docs/training/models.csv / models.md: every model x {bp, fg K=1, fg-mean K=4, frog K=4}
# trained briefly on mnist5k (20 SGD steps of 32 images, 5 steps for resnet18 and vit, whose forward
# gradients take seconds per step on a CPU; evaluated on 250 validation and 250 test images). lr=auto (the multi-tangent paper's tables: baydin_mlp = fc width 1024, fc width
# 256, resnet18, vit); baydin_cnn has no table entry and uses Baydin et al.'s lr 2e-4 for every method.
# STEPS (default 20) and LARGE_STEPS (default 5, resnet18 and vit) set the number of steps.
# Run from the repository root: bash docs/training/models_table.sh   (README: STEPS=100)
set -euo pipefail
FWDGRAD=${FWDGRAD:-.venv/bin/fwdgrad}
OUT=${OUT:-runs/models}
COMMON="methods=[bp,fg1,fg_mean4,frog4] epochs=1 batch_size=32 data.eval_batch_size=250 max_eval_batches=1 data.train_eval_samples=250 progress=false tensorboard=false"
for model in baydin_mlp baydin_cnn fc resnet18 vit; do
  # SKIP_DONE=1: keep the models whose comparison already finished
  if [ "${SKIP_DONE:-0}" = 1 ] && [ -f "$OUT/$model/compare.csv" ]; then continue; fi
  extra="lr=auto max_steps_per_epoch=${STEPS:-20}"
  [ "$model" = baydin_cnn ] && extra="lr=2e-4 max_steps_per_epoch=${STEPS:-20}"
  { [ "$model" = resnet18 ] || [ "$model" = vit ]; } && extra="lr=auto max_steps_per_epoch=${LARGE_STEPS:-5}"
  $FWDGRAD compare model=$model $extra $COMMON run_dir=$OUT/$model plot=false
done
.venv/bin/python - "$OUT" <<'PY'
import csv, os, sys
out = sys.argv[1]
rows = []
for model in ("baydin_mlp", "baydin_cnn", "fc", "resnet18", "vit"):
    with open(os.path.join(out, model, "compare.csv"), newline="") as file:
        rows += [{"model": model, **r} for r in csv.DictReader(file)]
columns = ["model", "method", "steps", "test_accuracy_last", "final_train_loss", "ms_per_step", "ratio_to_bp", "peak_memory_mb", "lr"]
with open("docs/training/models.csv", "w", newline="") as file:
    writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
lines = ["| model | method | steps | test acc | final train loss | ms/step | × bp | peak MB | lr |", "|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    lines.append(f"| {r['model']} | {r['method']} | {r['steps']} | {float(r['test_accuracy_last']):.3f} | {float(r['final_train_loss']):.3f} | "
                 f"{float(r['ms_per_step']):.0f} | {float(r['ratio_to_bp']):.1f} | {float(r['peak_memory_mb']):.0f} | {float(r['lr']):.3g} |")
open("docs/training/models.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
