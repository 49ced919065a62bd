#!/bin/bash
# The tracked tree is about 64 MiB, all that one device call may carry. Before a call:
#   bash docs/gpu/travel_light.sh hide      # the bulky documents leave the index (their files stay)
# then run with carry [".whl", ".gpu"] (wheels and the SmolLM2 config: docs/gpu/run_device.sh),
# and after the last call:
#   bash docs/gpu/travel_light.sh restore   # the index and .git/info/exclude as they were
# `hide` prints what would travel. Nothing is committed either way; restore before committing.
set -eu
cd "$(git rev-parse --show-toplevel)"
mark="# travel_light.sh: hidden while a device call runs"
case "${1:-}" in
hide)
  grep -qF "$mark" .git/info/exclude 2>/dev/null && { echo "already hidden"; exit 0; }
  git diff --cached --quiet || { echo "travel_light.sh: commit or unstage first (the index is restored from HEAD)"; exit 1; }
  { git ls-files docs | grep -E '^docs/issue|^docs/[^/]*\.(png|json)$'; git ls-files models/draft-v1 models/companion-v1; } > .git/travel_light
  git rm -q --cached --pathspec-from-file=.git/travel_light
  mkdir -p .git/info
  printf '%s\n/docs/issue*/\n/docs/*.png\n/docs/*.json\n/models/draft-v1/\n/models/companion-v1/\n' "$mark" >> .git/info/exclude
  (git ls-files; git ls-files --others --exclude-standard) | sort -u | tr '\n' '\0' | xargs -0 stat -c %s 2>/dev/null \
    | awk '{s += $1} END {printf "the tree that travels: %.1f MiB\n", s / 1048576}'
  ;;
restore)
  [ -f .git/travel_light ] && git reset -q --pathspec-from-file=.git/travel_light
  rm -f .git/travel_light
  if [ -f .git/info/exclude ]; then
    awk -v m="$mark" '$0 == m {skip = 5; next} skip > 0 {skip--; next} {print}' .git/info/exclude > .git/info/exclude.new
    mv .git/info/exclude.new .git/info/exclude
  fi
  git status --short | head
  ;;
*) echo "usage: bash docs/gpu/travel_light.sh hide|restore"; exit 2 ;;
esac
