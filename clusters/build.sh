#!/usr/bin/env bash
# Build raydd's cluster image from clusters/Dockerfile with the versions in
# clusters/versions.env, tag it REGISTRY/raydd:IMAGE_TAG, and push it with --push.
#   clusters/build.sh REGISTRY [--push]
# REGISTRY, for example:
#   AWS ECR:                 YOUR-ACCOUNT-ID.dkr.ecr.us-west-2.amazonaws.com
#   GCP Artifact Registry:   us-central1-docker.pkg.dev/YOUR-PROJECT-ID/raydd
# Needs Docker with BuildKit (the default since Docker 23) and, for --push, a
# `docker login` to REGISTRY (clusters/README.md). Prints the image name.
set -euo pipefail

registry="${1:?usage: clusters/build.sh REGISTRY [--push]}"
push="${2:-}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
versions="$root/clusters/versions.env"

set -a
# shellcheck source=/dev/null
source "$versions"
set +a

build_args=()
while IFS='=' read -r key _; do
    if [[ "$key" =~ ^[A-Z_]+$ ]]; then
        build_args+=(--build-arg "$key=${!key}")
    fi
done < "$versions"

image="$registry/raydd:$IMAGE_TAG"
# linux/amd64: every node type in clusters/ is x86_64, also when building on a Mac.
docker build --platform linux/amd64 -f "$root/clusters/Dockerfile" \
    "${build_args[@]}" -t "$image" "$root" >&2
if [[ "$push" == "--push" ]]; then
    docker push "$image" >&2
fi
echo "$image"
