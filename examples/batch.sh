#!/usr/bin/env bash
# A shell batch job: every portrait x every speech clip in this folder -> out/<face>_<speech>.mp4
# The reference features of each portrait are computed once and reused from the
# static-feature cache by the following renders; a failed job is reported and the loop
# goes on; finished videos are skipped when the job is run again.
set -u
cd "$(dirname "$0")"
LCP=${LCP:-lcp}
mkdir -p out
failed=0
for face in face.png face2.png; do
  for speech in speech.wav speech2.wav; do
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
