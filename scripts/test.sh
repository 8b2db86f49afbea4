#!/usr/bin/env bash
# The test command (README, .ci/run): starts the real services, prepares the Python peers, builds
# celeriac and runs every unit and integration test against the real peers.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${CELERIAC_CACHE:-$HOME/.cache/celeriac}/target}"
bash scripts/services.sh
bash scripts/python-peers.sh >/dev/null
cargo build --workspace --bins
# Integration tests start worker processes and Dagster step processes: two at a time fit 2 cores.
cargo test --workspace -- --test-threads="${CELERIAC_TEST_THREADS:-2}"
