#!/usr/bin/env bash
# Installs Debian's Chromium for the dashboard test (flower_compat.rs drives it headless over the
# DevTools protocol). Idempotent; prints the browser's path.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
command -v chromium
