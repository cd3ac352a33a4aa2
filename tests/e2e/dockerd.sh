#!/usr/bin/env bash
# Make a Docker engine answer here: Debian's docker.io, started by hand when no init system does
# (build machines and CI have none). Idempotent: an engine that already answers is left alone.
# Exit 3: this machine cannot run one (no root/apt, or the engine does not start); the image
# builds and the real node's tests then skip, saying why.
set -euo pipefail
cache="${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}/docker"
cannot() { echo "no Docker engine here: $*" >&2; exit 3; }
export DOCKER_BUILDKIT=0

docker info >/dev/null 2>&1 && exit 0
if ! command -v dockerd >/dev/null || ! command -v jq >/dev/null; then
  [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null || cannot "dockerd missing, and no apt-get as root"
  apt-get install -y -qq docker.io jq >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq docker.io jq >/dev/null; } ||
    cannot "apt-get install docker.io failed"
fi
[[ $(id -u) == 0 ]] || cannot "dockerd needs root"

# Sandboxes without CAP_SYS_RESOURCE refuse a negative oom_score_adj (the kubelet gives every
# pod sandbox -998), and runc then fails with "can't get final child's PID from pipe". This
# runtime clamps it to 0 in the bundle's config.json, then is runc.
mkdir -p "$cache"
wrapper="$cache/runc-oom-clamp"
cat > "$wrapper" <<'WRAP'
#!/bin/sh
prev=""
for a in "$@"; do
  if [ "$prev" = "--bundle" ] || [ "$prev" = "-b" ]; then bundle="$a"; fi
  prev="$a"
done
if [ -n "${bundle:-}" ] && [ -f "$bundle/config.json" ]; then
  tmp="$bundle/config.json.kt"
  if jq '(.process.oomScoreAdj // 0) as $o | if $o < 0 then .process.oomScoreAdj = 0 else . end' \
       "$bundle/config.json" > "$tmp"; then mv "$tmp" "$bundle/config.json"; else rm -f "$tmp"; fi
fi
exec runc "$@"
WRAP
chmod +x "$wrapper"

setsid dockerd --storage-driver=overlay2 --add-runtime "kubetune=$wrapper" \
  --default-runtime kubetune >"$cache/dockerd.log" 2>&1 < /dev/null &
for _ in $(seq 60); do
  docker info >/dev/null 2>&1 &&
    { echo "dockerd started in $SECONDS s, install included (log: $cache/dockerd.log)"; exit 0; }
  sleep 1
done
tail -20 "$cache/dockerd.log" >&2
cannot "dockerd did not answer within 60 s"
