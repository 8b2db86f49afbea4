#!/usr/bin/env bash
# celeriac's test cluster: the REAL Kubernetes v1.20.2 control plane (etcd, kube-apiserver with RBAC
# + Node authorization and an audit log, kube-controller-manager, kube-scheduler) on loopback, plus
# celeriac's process kubelet as its one node. See shared/reference/k8s-testing.md.
#
#   k8s-cluster.sh up                 start it unless already healthy (idempotent, safe concurrently)
#   k8s-cluster.sh down               stop everything
#   k8s-cluster.sh restart-apiserver  stop and start kube-apiserver only (tests of reconnection)
#   k8s-cluster.sh status             exit 0 when the API server is ready and the node Ready
#
# Identities (bearer tokens, pki/tokens.csv): admin (system:masters); the kubelet
# (system:node:proc-node); celeriac-worker-1..9 (group celeriac-workers, no rights until a test binds
# a Role); their kubeconfigs are in $RUN/kubeconfig-<user>. The audit log ($RUN/logs/audit.log)
# records every request of group celeriac-workers (metadata level), for request counting.
#
# Environment: CELERIAC_K8S_RUN (default /tmp/celeriac-k8s), CELERIAC_KUBELET_BIN (default
# $CARGO_TARGET_DIR/debug/celeriac-kubelet), CELERIAC_IMAGE_PATHS ("prefix=dir prefix=dir", images
# the process kubelet maps onto local directories).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
RUN="${CELERIAC_K8S_RUN:-/tmp/celeriac-k8s}"
CACHE="${CELERIAC_CACHE:-$HOME/.cache/celeriac}"
TARGET="${CARGO_TARGET_DIR:-$CACHE/target}"
KUBELET_BIN="${CELERIAC_KUBELET_BIN:-$TARGET/debug/celeriac-kubelet}"
VENV="${CELERIAC_VENV:-$CACHE/venv}"
IMAGE_PATHS="${CELERIAC_IMAGE_PATHS:-celeriac/dagster-step=$VENV/bin celeriac/celeriac=$TARGET/debug}"
API=https://127.0.0.1:6443
ADMIN_TOKEN=admintoken-celeriac

log() { echo "k8s-cluster: $*" >&2; }

ready() {
  [[ "$(curl -sk --max-time 2 -H "Authorization: Bearer $ADMIN_TOKEN" $API/readyz 2>/dev/null)" == ok ]]
}

node_ready() {
  curl -sk --max-time 2 -H "Authorization: Bearer $ADMIN_TOKEN" $API/api/v1/nodes/proc-node 2>/dev/null |
    python3 -c 'import json,sys
n=json.load(sys.stdin)
ok=any(c["type"]=="Ready" and c["status"]=="True" for c in n.get("status",{}).get("conditions",[]))
taints=[t for t in n.get("spec",{}).get("taints",[]) or [] if t.get("effect")=="NoSchedule"]
sys.exit(0 if ok and not taints else 1)' 2>/dev/null
}

alive() { [[ -f "$RUN/$1.pid" ]] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

wait_for() {  # wait_for <what> <seconds> <command...>
  local what=$1 secs=$2; shift 2
  for _ in $(seq 1 $((secs * 4))); do "$@" && return 0; sleep 0.25; done
  log "$what not ready after ${secs}s; logs in $RUN/logs"; tail -n 30 "$RUN/logs/"*.log >&2 || true; return 1
}

start_bg() {  # start_bg <name> <command...>
  local name=$1; shift
  # fd 8 (the start lock) must not leak into the daemons, or the lock is held for their lifetime.
  nohup "$@" >"$RUN/logs/$name.log" 2>&1 8>&- &
  echo $! >"$RUN/$name.pid"
}

kubeconfig() {  # kubeconfig <file> <token>
  cat >"$1" <<KC
apiVersion: v1
kind: Config
current-context: c
clusters: [{name: c, cluster: {server: "$API", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: "$2"}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
KC
}

start_apiserver() {
  start_bg apiserver "$BIN/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 --secure-port=6443 --cert-dir="$RUN/pki/serving" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local --service-account-key-file="$RUN/pki/sa.pub" \
    --service-account-signing-key-file="$RUN/pki/sa.key" --api-audiences=https://kubernetes.default.svc.cluster.local \
    --token-auth-file="$RUN/pki/tokens.csv" --authorization-mode=Node,RBAC --service-cluster-ip-range=10.96.0.0/16 \
    --enable-admission-plugins=NamespaceLifecycle,LimitRanger,DefaultStorageClass,DefaultTolerationSeconds,ResourceQuota,NodeRestriction \
    --disable-admission-plugins=ServiceAccount --kubelet-preferred-address-types=InternalIP --allow-privileged=true \
    --feature-gates=TTLAfterFinished=true --max-requests-inflight=1000 --max-mutating-requests-inflight=500 \
    --audit-policy-file="$RUN/pki/audit-policy.yaml" --audit-log-path="$RUN/logs/audit.log"
  wait_for kube-apiserver 90 ready
}

up() {
  if ready && node_ready && alive kubelet; then return 0; fi
  BIN=$(bash scripts/k8s-build.sh)
  [[ -x "$KUBELET_BIN" ]] || { log "process kubelet binary $KUBELET_BIN missing (cargo build -p celeriac-kubelet)"; exit 1; }
  down_quiet
  rm -rf "$RUN"; mkdir -p "$RUN"/{pki/serving,logs,kubelet}
  openssl genrsa -out "$RUN/pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$RUN/pki/sa.key" -pubout -out "$RUN/pki/sa.pub" 2>/dev/null
  {
    echo "$ADMIN_TOKEN,admin,admin-uid,\"system:masters\""
    echo "kubelettoken-celeriac,system:node:proc-node,kubelet-uid,\"system:nodes\""
    for i in $(seq 1 9); do echo "workertoken-$i,celeriac-worker-$i,worker-$i-uid,\"celeriac-workers\""; done
  } >"$RUN/pki/tokens.csv"
  cat >"$RUN/pki/audit-policy.yaml" <<'AP'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  userGroups: ["celeriac-workers", "system:serviceaccounts"]
- level: None
AP
  kubeconfig "$RUN/kubeconfig" "$ADMIN_TOKEN"
  kubeconfig "$RUN/kubeconfig-kubelet" kubelettoken-celeriac
  for i in $(seq 1 9); do kubeconfig "$RUN/kubeconfig-celeriac-worker-$i" "workertoken-$i"; done

  start_bg etcd "$BIN/etcd" --name t --data-dir "$RUN/etcd-data" --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
    --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster t=http://127.0.0.1:2380 --unsafe-no-fsync
  wait_for etcd 30 curl -sf --max-time 1 http://127.0.0.1:2379/health -o /dev/null
  start_apiserver
  start_bg controller-manager "$BIN/kube-controller-manager" --kubeconfig="$RUN/kubeconfig" \
    --authentication-kubeconfig="$RUN/kubeconfig" --authorization-kubeconfig="$RUN/kubeconfig" \
    --bind-address=127.0.0.1 --secure-port=10257 --port=0 --leader-elect=false --kube-api-qps=500 --kube-api-burst=1000 \
    --controllers=job,deployment,replicaset,ttl-after-finished,garbagecollector,namespace,serviceaccount,serviceaccount-token,podgc,nodelifecycle \
    --service-account-private-key-file="$RUN/pki/sa.key" --root-ca-file="$RUN/pki/serving/apiserver.crt" \
    --feature-gates=TTLAfterFinished=true
  start_bg scheduler "$BIN/kube-scheduler" --kubeconfig="$RUN/kubeconfig" --authentication-kubeconfig="$RUN/kubeconfig" \
    --authorization-kubeconfig="$RUN/kubeconfig" --bind-address=127.0.0.1 --secure-port=10259 --port=0 \
    --leader-elect=false --kube-api-qps=500 --kube-api-burst=1000
  local paths=()
  for p in $IMAGE_PATHS; do paths+=(--image-path "$p"); done
  start_bg kubelet "$KUBELET_BIN" --kubeconfig "$RUN/kubeconfig-kubelet" --root-dir "$RUN/kubelet" "${paths[@]}"
  wait_for "node proc-node" 90 node_ready
  log "up: KUBECONFIG=$RUN/kubeconfig"
}

down_quiet() {
  for n in kubelet scheduler controller-manager apiserver etcd; do
    if [[ -f "$RUN/$n.pid" ]]; then kill "$(cat "$RUN/$n.pid")" 2>/dev/null || true; fi
  done
  # Leftovers of an earlier run without pid files (a machine reused across checkouts).
  pkill -f "$RUN/kubelet" 2>/dev/null || true
  sleep 0.5
}

case "${1:-up}" in
  up)
    mkdir -p "$(dirname "$RUN")"
    exec 8>"$RUN.lock"; flock 8
    up ;;
  down) down_quiet ;;
  restart-apiserver)
    BIN=$(bash scripts/k8s-build.sh)
    kill "$(cat "$RUN/apiserver.pid")" 2>/dev/null || true
    for _ in $(seq 1 40); do alive apiserver || break; sleep 0.25; done
    start_apiserver ;;
  status) ready && node_ready ;;
  *) echo "usage: $0 up|down|restart-apiserver|status" >&2; exit 2 ;;
esac
