#!/usr/bin/env bash
# The test command (README, .ci/run): starts the real services, prepares the Python peers, builds
# celeriac and runs every unit and integration test against the real peers.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${CELERIAC_CACHE:-$HOME/.cache/celeriac}/target}"
bash scripts/services.sh
bash scripts/python-peers.sh >/dev/null
# Debian's Chromium for the flower-compat dashboard test (tests/tests/flower_compat.rs).
bash scripts/browser.sh >/dev/null
# Helm v4 (helm-python-sdk) and the upstream CRD models for the chart tests (tests/tests/helm_chart.rs).
bash scripts/chart-peers.sh >/dev/null
# Real Prometheus 2.42 + promtool from Debian's package for the monitoring tests (tests/tests/prometheus.rs);
# the package's service is never started, the tests run the binary on loopback.
bash scripts/prometheus.sh >/dev/null
# One venv per older Dagster release of the version matrix (tests/tests/dagster_versions.rs), cached
# (≈ 1 min each, once per machine).
bash scripts/dagster-versions.sh >/dev/null
# The Kubernetes 1.20.2 control plane for the Kubernetes tests: built once into the cache (~5 min on
# a fresh machine), started by the first test that needs it, with this run's binaries.
bash scripts/k8s-build.sh >/dev/null
bash scripts/k8s-cluster.sh down
trap 'bash scripts/k8s-cluster.sh down' EXIT
cargo build --workspace --bins
# Integration tests start worker processes and Dagster step processes: two at a time fit 2 cores.
cargo test --workspace -- --test-threads="${CELERIAC_TEST_THREADS:-2}"
# The load test's small scenarios (loadtest/): fail when a run is lost, a step runs twice or a figure is
# missing (the figures of a quick run are not reported). `worker` uses the Kubernetes test cluster: it
# starts it if no test left it up (same binaries and image paths as the tests), and the EXIT trap above
# stops it.
"$CARGO_TARGET_DIR/debug/celeriac-loadtest" --quick coordinator worker
