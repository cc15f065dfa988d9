#!/usr/bin/env bash
# The CPU runs behind docs/STUDY.md (issue 12), in priority order. Every sweep resumes where its folder's
# results.jsonl stops, so the script can be stopped and started again (a finished point is never re-run).
#   bash scripts/study/study_grid.sh            # runs/study/<model>/<mode>-<positions>/ and runs/study-tasks/<model>/
#   PYTHONPATH=. python scripts/study/study_tables.py runs/study    # the tables of docs/STUDY.md
# Protocol everywhere: the official COUNTDOWN one (int(D·s) dropped, strict ties, mean-of-k-th thresholds),
# 8 x 512 calibration tokens, 2048 evaluation tokens (1024 on Qwen2.5-Coder-1.5B, ~1 min a point).
set -uo pipefail
cd "$(dirname "$0")/.."
CD=${CD:-.venv/bin/countdown}
ALL=cats,teal,m-countdown,d-countdown-ideal,d-countdown,dejavu,s-countdown,dhar,chess,wina,r-sparse
mkdir -p runs/study runs/study-tasks

log() { echo "[$(date +%T)] $*" >> runs/study/grid.log; }

sweep() {  # model mode positions methods sparsities eval-tokens
  log "$1 $2 $3 $4 @ $5"
  "$CD" sweep -m "$1" --methods "$4" --sparsities "$5" --mode "$2" --positions "$3" --ties strict \
    --threshold-rule mean-kth --eval-tokens "$6" --no-prefetch --out "runs/study/$1/$2-$3" \
    >> "runs/study/$1-$2-$3.log" 2>&1
  log "done ($?)"
}

TASKS2=countdown_bigbench_social_iqa_cloze,countdown_bigbench_emoji_movie_cloze
tasks() {  # model tasks: docs/STUDY.md §5 (offline BIG-bench tasks, 100 examples each, 70% top-k, official protocol)
  log "$1 tasks $2"
  "$CD" sweep -m "$1" --methods cats,m-countdown,d-countdown-ideal,chess --sparsities 0.7 --mode topk \
    --official --tasks "$2" --task-limit 100 --eval-tokens 2048 --no-prefetch --out "runs/study-tasks/$1" \
    >> "runs/study-tasks/$1.log" 2>&1
  log "done ($?)"
}

Q15=qwen2.5-coder-1.5b
# 1. the headline protocol (top-k, official positions): every method on every model
sweep $Q15 topk decode "$ALL" 0.5,0.7,0.9 1024
sweep gemma3-270m topk decode "$ALL" 0.5,0.7,0.8,0.9 2048
sweep qwen2.5-coder-0.5b topk decode "$ALL" 0.5,0.7,0.8,0.9 2048
# 2. task accuracy beyond SmolLM2
tasks gemma3-270m $TASKS2
tasks qwen2.5-coder-0.5b $TASKS2
# 3. threshold mode (the paper's practical setting), official positions
sweep gemma3-270m threshold decode "$ALL" 0.5,0.7,0.8,0.9 2048
sweep qwen2.5-coder-0.5b threshold decode "$ALL" 0.5,0.7,0.8,0.9 2048
sweep $Q15 threshold decode cats,teal,m-countdown,d-countdown-ideal,s-countdown,chess,wina,r-sparse 0.5,0.7,0.9 1024
# 4. every position sparse (the strict protocol): every method at 50/70/90% in top-k, the headline six in threshold
HEAD=cats,teal,m-countdown,d-countdown-ideal,s-countdown,chess
sweep gemma3-270m topk all "$ALL" 0.5,0.7,0.9 2048
sweep qwen2.5-coder-0.5b topk all "$ALL" 0.5,0.7,0.9 2048
sweep $Q15 topk all "$HEAD" 0.5,0.7,0.9 1024
sweep gemma3-270m threshold all "$HEAD" 0.5,0.7,0.9 2048
sweep qwen2.5-coder-0.5b threshold all "$HEAD" 0.5,0.7,0.9 2048
sweep smollm2 topk all "$ALL" 0.5,0.7,0.9 2048
# 5. the 80% column on the largest model; all four shipped tasks on SmolLM2
sweep $Q15 topk decode "$ALL" 0.8 1024
tasks smollm2 $TASKS2,countdown_bigbench_riddle_sense_cloze,countdown_bigbench_timedial_cloze
# 6. filling in: the headline six in threshold-all on SmolLM2; the predictor and DejaVu in threshold mode on Qwen 1.5B
sweep smollm2 threshold all s-countdown,chess 0.5,0.7,0.9 2048
sweep $Q15 threshold decode d-countdown,dejavu 0.5,0.7,0.9 1024
log "grid finished"
