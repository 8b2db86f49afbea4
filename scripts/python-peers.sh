#!/usr/bin/env bash
# Creates (or reuses) the virtualenv holding the Python reference peers: celery, dagster + dagster-celery-k8s,
# flower. They are test clients only, never part of the product. The venv lives outside the repo so a clean
# checkout reuses it; it is rebuilt when the pinned set changes.
set -euo pipefail
CACHE="${CELERIAC_CACHE:-$HOME/.cache/celeriac}"
VENV="$CACHE/venv"
PINS=(
  "celery[redis]==5.7.0" "kombu==5.7.0" "flower==2.2.0"
  "dagster==1.13.27" "dagster-celery==0.29.27" "dagster-celery-k8s==0.29.27" "dagster-k8s==0.29.27"
  "dagster-postgres==0.29.27" "sqlalchemy<2.1" "psycopg2-binary" "redis" "prometheus-client"
)
stamp="$(printf '%s\n' "${PINS[@]}" | sha256sum | cut -c1-16)"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
# The coordinator's Dagster plugin (coordinator/python), installed editable from this checkout: Dagster
# loads CeleriacRunLauncher from the test instances' dagster.yaml.
install_plugin() {
  local where
  where="$("$VENV/bin/python" -c 'import dagster_celeriac, os; print(os.path.dirname(os.path.dirname(dagster_celeriac.__file__)))' 2>/dev/null || true)"
  if [ "$where" != "$REPO/coordinator/python" ]; then
    "$VENV/bin/pip" install -q --no-deps -e "$REPO/coordinator/python" >&2
  fi
}
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.pins" 2>/dev/null)" = "$stamp" ]; then
  install_plugin
  echo "$VENV"; exit 0
fi
mkdir -p "$CACHE"
rm -rf "$VENV"
python3 -m venv "$VENV" >&2
"$VENV/bin/pip" install -q --upgrade pip >&2
"$VENV/bin/pip" install -q "${PINS[@]}" >&2
echo "$stamp" > "$VENV/.pins"
install_plugin
echo "$VENV"
