#!/usr/bin/env bash
# What a slice of experiment=fmnist_tradeoff (11 arms x lr_scale 1,3 x seed 1) costs with issue 21's savings off
# ("before": no zero-shot cache, stock attention, dense masked gradients, the augmented linear probe) and on
# ("after": the defaults), as two single-thread lanes side by side, each with a fresh $SAFT_CACHE_DIR holding only
# the pretrained benchmark checkpoint. Prints each lane's wall time; results land in $OUT (default /tmp/sweeps).
#   bash benchmarks/sweep_before_after.sh          # run from the repository root, with .venv set up
set -eu
OUT=${OUT:-/tmp/sweeps}
PY=${PY:-.venv/bin/python}
CKPT=$(ls "${SAFT_CACHE_DIR:-$HOME/.cache/saft}"/saft-fmnist-*.pt | head -1)  # built by any fmnist run
COMMON="experiment=fmnist_tradeoff seed=1 lr_scale=1,3 ${EXTRA:-}"  # EXTRA: overrides for a quick check
OFF="zeroshot_cache=false model.batch_first_attention=false"
rm -rf "$OUT" && mkdir -p "$OUT"
for lane in before after; do mkdir -p "$OUT/cache_$lane" && cp "$CKPT" "$OUT/cache_$lane/"; done
lane() {  # name, then one multirun's overrides per argument
  local name=$1 start=$SECONDS; shift
  for overrides in "$@"; do
    SAFT_CACHE_DIR=$OUT/cache_$name OMP_NUM_THREADS=1 WANDB_MODE=disabled $PY train.py -m $COMMON $overrides \
      hydra.sweep.dir=$OUT/$name/$(echo "$overrides" | md5sum | cut -c1-8) >> "$OUT/$name.log" 2>&1
  done
  echo "$name: $((SECONDS - start)) s"
}
lane before "arm=saft,saft_no_embed,saft_no_embed_1pct,random_mask $OFF method.mask.sparse_grads=false" \
            "arm=full_ft,full_ft_text,lp_ft,bitfit,coop,flyp $OFF" "arm=linear_probe $OFF method.augment=null" &
lane after "" &
wait
echo "zero-shot evaluations per lane (results.json zeroshot_from):"
for name in before after; do
  echo "  $name: $(grep -rho '"zeroshot_from": "[a-z]*"' "$OUT/$name" | sort | uniq -c | tr '\n' ' ')"
done
