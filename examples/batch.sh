#!/usr/bin/env bash
# Every portrait x every speech clip in this folder -> out/<face>_<speech>.mp4, two ways.
#
#   ./batch.sh loop  [lcp options]   one `lcp render` per video (the shell way)
#   ./batch.sh batch [lcp options]   one `lcp batch` over a job file (the default)
#
# e.g. ./batch.sh batch --steps 8 --accel lightningcp
#
# The loop starts a process, loads the model and (cache permitting) reads each
# portrait's reference features once per video; its "resume" only checks that a file
# exists.  `lcp batch` loads the model once, computes each portrait's reference features
# once, reports failed jobs by line and goes on, and with --resume skips only outputs
# it verified complete (decoded frame count, same inputs and settings).
set -u
cd "$(dirname "$0")"
LCP=${LCP:-lcp}
FACES=(face.png face2.png)
SPEECH=(speech.wav speech2.wav)
mode=${1:-batch}
[ $# -gt 0 ] && shift

shell_loop() {
  mkdir -p out
  local failed=0 face speech out
  for face in "${FACES[@]}"; do
    for speech in "${SPEECH[@]}"; do
      out="out/${face%.*}_${speech%.*}.mp4"
      if [ -s "$out" ]; then echo "skip $out (exists)"; continue; fi
      if "$LCP" render "$face" "$speech" -o "$out" --quiet "$@"; then
        echo "ok   $out"
      else
        echo "FAIL $out (exit $?)" >&2
        failed=$((failed + 1))
      fi
    done
  done
  echo "$failed job(s) failed"
  [ "$failed" -eq 0 ]
}

lcp_batch() {
  # One JSON object per line.  Paths are relative to the job file's folder (out/); a job
  # may override steps, cfg, seed, fps, size, accel, ... (see docs/BATCH.md).
  mkdir -p out
  local face speech
  : >out/jobs.jsonl
  for face in "${FACES[@]}"; do
    for speech in "${SPEECH[@]}"; do
      printf '{"face": "../%s", "audio": "../%s", "output": "%s_%s.mp4"}\n' \
        "$face" "$speech" "${face%.*}" "${speech%.*}" >>out/jobs.jsonl
    done
  done
  # The report (per line: status ok/skipped/failed, reason, output, seconds; totals) goes
  # to out/report.json; exit code 0 when every job is ok or skipped, 23 when any failed.
  local rc=0
  "$LCP" batch out/jobs.jsonl --resume --json "$@" >out/report.json || rc=$?
  echo "report: out/report.json (exit $rc)"
  return $rc
}

case "$mode" in
  loop) shell_loop "$@" ;;
  batch) lcp_batch "$@" ;;
  *) echo "usage: $0 [loop|batch] [lcp options]" >&2; exit 2 ;;
esac
