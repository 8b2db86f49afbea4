#!/usr/bin/env bash
# Creates (or reuses) one virtualenv per older Dagster release the project supports, for the version
# matrix (tests/tests/dagster_versions.rs; fixtures in dagster/tests/fixtures/versions/). Each venv holds
# that release's dagster + dagster-celery(-k8s) + dagster-k8s + dagster-postgres (0.X.Y = dagster
# 1.(X-16).Y) and the Celery/Postgres clients the test jobs need. They live outside the repo
# ($CELERIAC_CACHE/dagster-<version>), are built once per machine (≈ 1–2 min each) and rebuilt when
# their pins change. The newest supported release (1.13.27) is the project venv (scripts/python-peers.sh).
#
#   dagster-versions.sh            builds every venv below, prints "<version> <venv>" per line
#   dagster-versions.sh <version>  builds that one, prints its venv
set -euo pipefail
shopt -s inherit_errexit
CACHE="${CELERIAC_CACHE:-$HOME/.cache/celeriac}"
# The matrix: the oldest supported minor line's last patch (1.9, Feb 2025), the 1.10 and 1.11 lines'
# last patches, 1.12's last, and 1.13.27 (project venv).
VERSIONS=(1.9.13 1.10.21 1.11.16 1.12.22)
pins_for() { # pins_for <dagster version>
  local v=$1 minor patch
  minor=$(echo "$v" | cut -d. -f2) patch=$(echo "$v" | cut -d. -f3)
  local lib="0.$((minor + 16)).$patch"
  echo "dagster==$v dagster-celery==$lib dagster-celery-k8s==$lib dagster-k8s==$lib dagster-postgres==$lib"
  # Celery 5.7 where the release allows it (1.10.x's dagster-celery does not resolve with it: pip
  # picks the newest 5.x that does).
  echo "celery[redis]>=5.4,<6 sqlalchemy<2.1 psycopg2-binary redis"
}
build() { # build <version>: prints the venv
  local v=$1 venv="$CACHE/dagster-$1" pins stamp
  # shellcheck disable=SC2207
  pins=($(pins_for "$v"))
  stamp="$(printf '%s\n' "${pins[@]}" | sha256sum | cut -c1-16)"
  if [ -x "$venv/bin/dagster" ] && [ "$(cat "$venv/.pins" 2>/dev/null)" = "$stamp" ]; then
    echo "$venv"; return 0
  fi
  echo "dagster-versions: building the dagster $v venv in $venv" >&2
  mkdir -p "$CACHE"
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q "${pins[@]}" >&2
  echo "$stamp" > "$venv/.pins"
  echo "$venv"
}
if [ $# -ge 1 ]; then
  build "$1"
else
  for v in "${VERSIONS[@]}"; do
    venv="$(build "$v")"
    echo "$v $venv"
  done
fi
