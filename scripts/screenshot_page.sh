#!/usr/bin/env bash
# Screenshot a results page of `vlpet eval --html` with headless Chromium:
#   scripts/screenshot_page.sh PAGE.html OUT.png [WIDTHxHEIGHT] [#FILTER]
# e.g. scripts/screenshot_page.sh runs/r1/eval/vqa-test.html docs/img/results-page.png 1280x900 '#wrong'
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 PAGE.html OUT.png [WIDTHxHEIGHT] [#FILTER]" >&2
  exit 2
fi
page=$1 out=$2 size=${3:-1280x900} hash=${4:-}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
  echo "$0: no chromium on PATH. Fix: install Debian's chromium package (apt-get install chromium)." >&2
  exit 2
fi
if [ ! -f "$page" ]; then
  echo "$0: $page: no such page. Fix: write one with vlpet eval RUN --html." >&2
  exit 2
fi
url="file://$(cd "$(dirname "$page")" && pwd)/$(basename "$page")$hash"
mkdir -p "$(dirname "$out")"
out_abs="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="${size/x/,}" \
  --screenshot="$out_abs" "$url" 2>/dev/null
test -s "$out_abs" && echo "$out_abs"
