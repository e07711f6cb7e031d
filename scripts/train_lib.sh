# Shared by scripts/train_fmnist32.sh and scripts/train_continuous.sh (sourced): run one named `mulosd train`
# into $R/NAME unless it already finished; continue it with --resume from the checkpoint a killed run left.
M=${MULOSD_BIN:-.venv/bin/mulosd}
R=${RUNS:-runs}

stage() {  # stage NAME ARGS... : run `mulosd train ARGS --out $R/NAME` unless already finished
  local name=$1; shift
  if [ -f "$R/$name/summary.json" ]; then echo "== $name: done"; return; fi
  local resume=(); [ -f "$R/$name/checkpoint.pt" ] && resume=(--resume)
  echo "== $name: $M train $* --out $R/$name ${resume[*]}"
  $M train "$@" --out "$R/$name" "${resume[@]}"
}
