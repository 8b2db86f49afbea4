#!/usr/bin/env bash
# Chart tooling for the chart tests (tests/tests/helm_chart.rs), outside the repo so a clean checkout
# reuses it: real Helm (v4, as the PyPI `helm-python-sdk` library, no helm binary) in its own
# virtualenv, and the upstream CRD validators of prometheus-operator and KEDA (npm
# `@kubernetes-models/*`, generated from the projects' CRDs). Prints the tool directory.
set -euo pipefail
CACHE="${CELERIAC_CACHE:-$HOME/.cache/celeriac}"
DIR="$CACHE/chart-tools"
PY_PINS=("helm-python-sdk==0.2.2" "PyYAML==6.0.2")
NPM_PINS=("@kubernetes-models/prometheus-operator@6.0.0" "@kubernetes-models/keda@0.4.2" "typescript@5.6.3")
stamp="$(printf '%s\n' "${PY_PINS[@]}" "${NPM_PINS[@]}" | sha256sum | cut -c1-16)"
if [ -x "$DIR/venv/bin/python" ] && [ -d "$DIR/node_modules/@kubernetes-models/keda" ] \
   && [ "$(cat "$DIR/.pins" 2>/dev/null)" = "$stamp" ]; then
  echo "$DIR"; exit 0
fi
rm -rf "$DIR"
mkdir -p "$DIR"
python3 -m venv "$DIR/venv" >&2
"$DIR/venv/bin/pip" install -q "${PY_PINS[@]}" >&2
(cd "$DIR" && echo '{"name":"celeriac-chart-tools","private":true,"type":"module"}' > package.json \
  && npm install --silent --no-audit --no-fund "${NPM_PINS[@]}" >&2)
echo "$stamp" > "$DIR/.pins"
echo "$DIR"
