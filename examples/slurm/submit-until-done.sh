#!/bin/bash
# Submit a chain of wall-time-limited jobs: each link starts only if the one before did not finish
# (--dependency=afternotok: killed at its time limit, cancelled, node failure), and resumes the sweep from
# its cache; links after a successful one are dropped (--kill-on-invalid-dep=yes).
#   usage: submit-until-done.sh [LINKS] [sbatch options...]      e.g.  submit-until-done.sh 5 --time=01:00:00
set -euo pipefail
cd "$(dirname "$0")"
links=${1:-5}
shift || true
previous=$(sbatch --parsable "$@" sweep.sbatch)
echo "submitted $previous"
for _ in $(seq 2 "$links"); do
  previous=$(sbatch --parsable --dependency=afternotok:"$previous" --kill-on-invalid-dep=yes "$@" sweep.sbatch)
  echo "submitted $previous (runs only if the job before it did not finish)"
done
