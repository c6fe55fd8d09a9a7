#!/usr/bin/env bash
# Fetch the JavaScript the rendered book loads (MathJax, RequireJS, the ipywidgets HTML manager) from the npm
# registry into _vendor/ (ignored by git), so pages render offline. Pinned versions; npm checks integrity.
set -euo pipefail
cd "$(dirname "$0")/.."
MATHJAX=mathjax@3.2.2
REQUIREJS=requirejs@2.3.8
HTML_MANAGER=@jupyter-widgets/html-manager@1.0.15
dest=_vendor/static/vendor
stamp="_vendor/.stamp-v3-$MATHJAX-$REQUIREJS-${HTML_MANAGER//\//_}"
if [ -f "$stamp" ] && [ -f "$dest/mathjax/tex-chtml.js" ]; then
  exit 0
fi
rm -rf _vendor && mkdir -p _vendor/npm "$dest"
(cd _vendor/npm && npm pack --silent "$MATHJAX" "$REQUIREJS" "$HTML_MANAGER" >/dev/null)
unpack() { mkdir -p "$2" && tar -xzf "$1" -C "$2" --strip-components=1; }
unpack _vendor/npm/mathjax-*.tgz _vendor/npm/mathjax
unpack _vendor/npm/requirejs-*.tgz _vendor/npm/requirejs
unpack _vendor/npm/jupyter-widgets-html-manager-*.tgz _vendor/npm/html-manager
cp -r _vendor/npm/mathjax/es5 "$dest/mathjax"
cp _vendor/npm/requirejs/require.js "$dest/require.min.js"
# embed-amd.js loads its fonts relative to its RequireJS module path: keep the npm layout, minus source maps
widgets="$dest/npm/@jupyter-widgets/html-manager/dist"
mkdir -p "$widgets"
find _vendor/npm/html-manager/dist -maxdepth 1 -type f ! -name "*.map" -exec cp {} "$widgets/" \;
# Some of its bundled modules are named @jupyter-widgets/<name>, so their fonts resolve one folder up: serve the
# fonts there too (which module asks first varies from load to load).
find _vendor/npm/html-manager/dist -maxdepth 1 -type f \( -name "*.woff*" -o -name "*.ttf" -o -name "*.eot" \
  -o -name "*.svg" \) -exec cp {} "$widgets/../../" \;
touch "$stamp"
echo "vendored JavaScript in $dest"
