#!/usr/bin/env bash
# Builds the REAL Kubernetes v1.20.2 control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler) from Debian bookworm's source package with Go 1.15 from bullseye, and unpacks
# etcd 3.4 from bookworm. Everything lives in the cache (default ~/.cache/celeriac/k8s-1.20.2),
# never in the repository; a complete cache is reused, a missing one is rebuilt (~4 min on 2 cores).
# Recipe: shared/reference/k8s-testing.md §1.2. Prints the bin directory on success.
set -euo pipefail
R="${CELERIAC_K8S_DIR:-${CELERIAC_CACHE:-$HOME/.cache/celeriac}/k8s-1.20.2}"
BIN="$R/bin"
if [[ -x "$BIN/kube-apiserver" && -x "$BIN/kube-controller-manager" && -x "$BIN/kube-scheduler" && -x "$BIN/etcd" ]]; then
  echo "$BIN"; exit 0
fi
mkdir -p "$(dirname "$R")"; exec 9>"$R.lock"
flock 9
if [[ -x "$BIN/kube-apiserver" && -x "$BIN/kube-controller-manager" && -x "$BIN/kube-scheduler" && -x "$BIN/etcd" ]]; then
  echo "$BIN"; exit 0
fi
mkdir -p "$R"/{apt/lists/partial,apt/cache/archives/partial,debs,src,bin,home}
cd "$R"
cat > apt/sources.list <<'SOURCES'
deb http://deb.debian.org/debian bookworm main
deb-src http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bullseye main
SOURCES
O=(-o "Dir::Etc::SourceList=$R/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
   -o "Dir::State::Lists=$R/apt/lists" -o "Dir::Cache=$R/apt/cache")
echo "k8s-build: fetching sources and toolchain into $R" >&2
apt-get "${O[@]}" update >&2
if ! ls src/kubernetes_*.orig.tar.gz >/dev/null 2>&1; then
  (cd src && apt-get "${O[@]}" source --download-only kubernetes=1.20.5+really1.20.2-1.1+deb12u1 >&2)
fi
(cd debs && apt-get "${O[@]}" download golang-1.15-go/bullseye golang-1.15-src/bullseye etcd-server/bookworm rsync/bookworm >&2)
rm -rf root115 etcd34 rsyncroot kubernetes-1.20.2
for f in debs/golang-1.15*.deb; do dpkg -x "$f" root115; done
dpkg -x debs/etcd-server_3.4*.deb etcd34
dpkg -x debs/rsync_*.deb rsyncroot
tar xzf src/kubernetes_1.20.5+really1.20.2.orig.tar.gz
export GOROOT="$R/root115/usr/lib/go-1.15" PATH="$R/root115/usr/lib/go-1.15/bin:$R/rsyncroot/usr/bin:$PATH" \
       HOME="$R/home" GOCACHE="$R/gocache115" CGO_ENABLED=0
echo "k8s-build: building kube-apiserver, kube-controller-manager, kube-scheduler (several minutes)" >&2
(cd kubernetes-1.20.2 && make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler" >&2)
cp kubernetes-1.20.2/_output/local/bin/linux/amd64/{kube-apiserver,kube-controller-manager,kube-scheduler} bin/
cp etcd34/usr/bin/etcd bin/etcd
# The source tree and Go cache are large and no longer needed.
rm -rf kubernetes-1.20.2 gocache115 "$R/home/go" root115/usr/share
echo "$BIN"
