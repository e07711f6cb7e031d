# Shared by scripts/mulo_report.sh and scripts/results_report.sh (sourced): run one named `mulosd bench`
# into $O/NAME unless it already finished; continue it with --resume when a killed run left its state, and clear
# an unfinished folder that has none with --force.
M=${MULOSD_BIN:-.venv/bin/mulosd}
O=${OUT:-docs/bench}

bench() {  # bench NAME ARGS...
  local name=$1; shift
  if [ -f "$O/$name/results.json" ] && grep -q '"complete": true' "$O/$name/results.json"; then echo "== $name: done"; return; fi
  # a killed run's state: continue it; an unfinished folder without state (nothing to resume): start it afresh
  local resume=(); if [ -f "$O/$name/state.json" ]; then resume=(--resume); elif [ -d "$O/$name" ]; then resume=(--force); fi
  echo "== $name: $M bench $* --out $O/$name ${resume[*]}"
  $M bench "$@" --out "$O/$name" "${resume[@]}" --no-progress > /dev/null
}
