#!/usr/bin/env bash
# Print this machine's Debian mirror for bookworm (the main archive, not -security), read from
# its apt sources: the project never names a package registry's host itself.
set -euo pipefail
shopt -s nullglob
for f in /etc/apt/sources.list.d/*.sources; do
  # deb822 stanzas: the first whose Suites has "bookworm" (not only bookworm-security).
  awk 'BEGIN{RS=""; FS="\n"} {u=""; s=""; for(i=1;i<=NF;i++){
         if($i ~ /^URIs:/){sub(/^URIs:[ \t]*/,"",$i); split($i,a,/[ \t]+/); u=a[1]}
         if($i ~ /^Suites:/){s=" "$i" "}}
       if(u!="" && s ~ /[ \t]bookworm[ \t]/){print u; exit}}' "$f" | grep . && exit 0
done
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
  awk '$1=="deb" && $0 !~ /security/ {for(i=2;i<=NF;i++) if($i ~ /^[a-z]+:\/\//){print $i; exit}}' "$f" |
    head -1 | grep . && exit 0
done
exit 1
