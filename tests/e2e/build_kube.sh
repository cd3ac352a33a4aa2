#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager, kube-scheduler and kubelet for
# tests/e2e/local_cluster.py (the last two give the suite a real node when Docker runs).
# No Kubernetes server binary ships in the registries reachable here; Debian's `kubernetes`
# source package (1.20.2, vendored dependencies) does, and builds with Debian's Go.
# Needs apt (root). Output: ${KUBETUNE_KUBE_BIN:-~/.cache/kubetune/kube/bin}. ~9 min on 2 cores.
set -euo pipefail

out="${KUBETUNE_KUBE_BIN:-$HOME/.cache/kubetune/kube/bin}"
work="${KUBETUNE_KUBE_SRC:-$HOME/.cache/kubetune/kube/src}"
bins=(kube-apiserver kube-controller-manager kube-scheduler kubelet)
built() { for b in "${bins[@]}"; do [[ -x "$out/$b" ]] || return 1; done; }
if built; then echo "already built: $out"; exit 0; fi
# Exit 3: this machine cannot build them (not Debian bookworm, no apt, not root, or the
# Debian archive out of reach); any other failure (the build itself) is an error.
cannot() { echo "cannot build kube-apiserver here: $*" >&2; exit 3; }
[[ $(id -u) == 0 ]] && command -v apt-get >/dev/null || cannot "needs apt-get as root"
# shellcheck disable=SC1091
. /etc/os-release 2>/dev/null || true
[[ "${ID:-}" == debian && "${VERSION_CODENAME:-}" == bookworm ]] ||
  cannot "needs Debian bookworm's kubernetes source package (this is ${PRETTY_NAME:-unknown})"

if ! apt-cache showsrc kubernetes >/dev/null 2>&1; then
  # The machine's own Debian mirror (never a host written here): the deb822 entry whose
  # Suites name bookworm, or a one-line "deb" entry.
  mirror=$(bash "$(dirname "$0")/../../trainer_image/debian_mirror.sh") || cannot "no Debian mirror in the apt sources"
  list=/etc/apt/sources.list.d/kubetune-src.sources
  cat > "$list" <<EOF
Types: deb-src
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  apt-get update -qq || { rm -f "$list"; cannot "apt-get update failed"; }
fi
apt-get install -y -qq golang-go golang-github-modern-go-reflect2-dev rsync jq openssl >/dev/null ||
  cannot "apt-get install failed"

mkdir -p "$work" "$out"
cd "$work"
ls kubernetes_*.orig.tar.gz >/dev/null 2>&1 || apt-get source --download-only kubernetes ||
  cannot "apt-get source kubernetes failed"
src=$(set +o pipefail; tar tzf kubernetes_*.orig.tar.gz | head -1 | cut -d/ -f1)
[[ -d "$src" ]] || tar xzf kubernetes_*.orig.tar.gz
cd "$src"
mkdir -p .go/src/k8s.io
[[ -L .go/src/k8s.io/kubernetes ]] || ln -s ../../.. .go/src/k8s.io/kubernetes
# reflect2 1.0.1 (vendored) crashes the API server under Go >= 1.18 (map iteration, SIGSEGV in
# json-iterator); Debian's 1.0.2 is the fixed release.
if [[ ! -f vendor/github.com/modern-go/reflect2/go_above_118.go ]]; then
  rm -rf vendor/github.com/modern-go/reflect2
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
  rm -f vendor/github.com/modern-go/reflect2/go.mod
fi
# The same environment as the package's debian/rules (GOPATH build, no cgo); `make` also runs
# the code generators (openapi definitions are not in the tarball).
env GOPATH="$PWD/.go" CGO_ENABLED=0 GOCACHE="$work/gocache" HOME="$work/home" \
  make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet"
for b in "${bins[@]}"; do cp "_output/bin/$b" "$out/"; done
"$out/kube-apiserver" --version
echo "built: $out in $SECONDS s (the four binaries; kubelet and kube-scheduler are the real node's)"
