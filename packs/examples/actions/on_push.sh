#!/usr/bin/env bash
# Receives the push as positional arguments: repo branch commit pusher.
set -euo pipefail
repo=$1 branch=$2 commit=$3 pusher=$4
printf 'push to %s %s at %s by %s\n' "$repo" "$branch" "$commit" "$pusher"
