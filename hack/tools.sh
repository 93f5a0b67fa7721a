#!/usr/bin/env bash
# Builds, from the Go module proxy, every binary the local control plane and S3
# server need, pinned by the wrapper modules under hack/go/*, and caches them
# outside the checkout, keyed by the pinned go.mod/go.sum and the Go version,
# so a warm machine skips the build.
#
#   hack/tools.sh build [NAME...]   build what is missing (default: all)
#   hack/tools.sh path NAME         print the path of NAME's binary (builds it if missing)
#   hack/tools.sh env               print NAME=path lines for every binary
#
# NAME is one of: kube-apiserver kube-controller-manager kube-scheduler kubectl
# etcd kwok helm versitygw.
set -euo pipefail

HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_DIR=${SMARTDIFF_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/smart-diffusion}
# Bump when the build recipe (flags, ldflags) changes, to invalidate the cache.
BUILD_REV=1
ALL_TOOLS=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm versitygw)

# name -> "wrapper-module-dir package"
tool_spec() {
  case $1 in
    kube-apiserver | kube-controller-manager | kube-scheduler | kubectl)
      echo "kubernetes k8s.io/kubernetes/cmd/$1" ;;
    etcd) echo "etcd ." ;;
    kwok) echo "kwok sigs.k8s.io/kwok/cmd/kwok" ;;
    helm) echo "helm helm.sh/helm/v3/cmd/helm" ;;
    versitygw) echo "versitygw github.com/versity/versitygw/cmd/versitygw" ;;
    *) echo "unknown tool '$1'; known: ${ALL_TOOLS[*]}" >&2; return 2 ;;
  esac
}

# The pinned version of the module a wrapper requires (for -X flags and names).
required_version() { # module-dir module-path
  awk -v m="$2" '$1 == "require" && $2 == m { print $3 } $1 == m { print $2 }' "$HACK_DIR/go/$1/go.mod" | head -n1
}

tool_dir() {
  local spec mod key
  spec=$(tool_spec "$1")
  mod=${spec%% *}
  key=$( (cat "$HACK_DIR/go/$mod/go.mod" "$HACK_DIR/go/$mod/go.sum"; echo "$BUILD_REV") | sha256sum | cut -c1-12)
  echo "$CACHE_DIR/bin/$1-$(go env GOVERSION)-$key"
}

ldflags_for() {
  local v maj min
  case $1 in
    kube-apiserver | kube-controller-manager | kube-scheduler | kubectl)
      v=$(required_version kubernetes k8s.io/kubernetes)
      maj=${v#v}; maj=${maj%%.*}
      min=${v#v*.}; min=${min%%.*}
      local x
      for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        x+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$maj -X $pkg.gitMinor=$min"
        x+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
      done
      echo "-s -w$x" ;;
    helm)
      echo "-s -w -X helm.sh/helm/v3/internal/version.version=$(required_version helm helm.sh/helm/v3)" ;;
    kwok)
      echo "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$(required_version kwok sigs.k8s.io/kwok)" ;;
    *) echo "-s -w" ;;
  esac
}

build_one() {
  local name=$1 dir spec mod pkg
  dir=$(tool_dir "$name")
  [[ -x $dir/$name ]] && return 0
  spec=$(tool_spec "$name"); mod=${spec%% *}; pkg=${spec#* }
  mkdir -p "$CACHE_DIR/bin"
  # One builder at a time per tool (parallel test workers may all ask).
  exec {lock}>"$CACHE_DIR/bin/.$name.lock"
  flock "$lock"
  if [[ ! -x $dir/$name ]]; then
    echo ">> building $name ($(go env GOVERSION)) -> $dir" >&2
    local start=$SECONDS tmp
    tmp=$(mktemp -d "$CACHE_DIR/bin/.$name.XXXXXX")
    (cd "$HACK_DIR/go/$mod" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath \
      -ldflags "$(ldflags_for "$name")" -o "$tmp/$name" "$pkg")
    rm -rf "$dir"; mv "$tmp" "$dir"
    echo ">> built $name in $((SECONDS - start))s" >&2
  fi
  flock -u "$lock"
}

cmd=${1:-build}; shift || true
case $cmd in
  build)
    [[ $# -gt 0 ]] || set -- "${ALL_TOOLS[@]}"
    for t in "$@"; do build_one "$t"; done ;;
  path)
    build_one "$1"; echo "$(tool_dir "$1")/$1" ;;
  env)
    for t in "${ALL_TOOLS[@]}"; do build_one "$t"; echo "$t=$(tool_dir "$t")/$t"; done ;;
  *) echo "usage: $0 build [NAME...] | path NAME | env" >&2; exit 2 ;;
esac
