#!/usr/bin/env bash
# Real Prometheus for the monitoring tests (tests/tests/prometheus.rs): Debian's `prometheus` package
# (2.42, with `promtool`), installed with apt when missing. The package's system service is never
# started (a policy-rc.d guard during the install; the tests run the binary themselves on loopback with
# their own data directory). Idempotent. Prints the directory holding `prometheus` and `promtool`.
set -euo pipefail
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  echo "prometheus.sh: installing Debian's prometheus package" >&2
  guard=/usr/sbin/policy-rc.d
  placed=0
  if [ ! -e "$guard" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$guard" && chmod +x "$guard" && placed=1
  fi
  trap '[ "$placed" = 1 ] && rm -f "$guard"' EXIT
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
dir="$(dirname "$(command -v promtool)")"
"$dir/prometheus" --version 2>&1 | head -n1 >&2
echo "$dir"
