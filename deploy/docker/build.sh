#!/usr/bin/env bash
# Builds the container images of deploy/docker with buildah, with no Docker daemon and no image registry, then
# runs each once: `make images` (all three) or `deploy/docker/build.sh search flows ray-worker` from the
# repository root. Where a registry is reachable, `docker build` of the same Dockerfiles works as their headers
# say; this is the path for machines without one (and what the tests use).
#
#   BASE       the Python base image (default localhost/cirflow-python:3.11). When that tag is missing, it is
#              made from Debian's packages: mmdebstrap's bookworm root filesystem + python-base.Dockerfile.
#   WHEELS     a folder holding the CPU torch wheel, mounted into the torch images' builds (default: pip's
#              find-links folder when it holds torch; empty: PyTorch's CPU index).
#   CA_BUNDLE  the CA certificates the builds' pip trusts (default: this machine's bundle, so that a build
#              works behind the same TLS-inspecting proxy as the host); mounted for the build only.
#   TAG        the images' tag (default latest).
# Chroot isolation unless BUILDAH_ISOLATION says otherwise: it needs no nested namespaces (CI runners, sandboxes).
# Prints one line per image built: name, size, build seconds; the smoke runs fail the script when an image is wrong.
set -euo pipefail

cd "$(dirname "$0")/../.."
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
BASE=${BASE:-localhost/cirflow-python:3.11}
TAG=${TAG:-latest}
CA_BUNDLE=${CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
TORCH_WHEEL=torch-2.13.0+cpu-cp311-*.whl

fail() { echo "build.sh: $*" >&2; exit 1; }

command -v buildah >/dev/null || fail "buildah is not installed (Debian/Ubuntu: apt-get install buildah mmdebstrap)"
buildah info >/dev/null 2>&1 || fail "buildah cannot start here: $(buildah info 2>&1 | tail -1)"

if [ -z "${WHEELS+set}" ]; then
  WHEELS=
  for folder in $(python3 -m pip config get global.find-links 2>/dev/null || true); do
    if compgen -G "$folder/$TORCH_WHEEL" >/dev/null; then WHEELS=$folder; break; fi
  done
fi
[ -z "$WHEELS" ] || compgen -G "$WHEELS/$TORCH_WHEEL" >/dev/null || fail "WHEELS=$WHEELS holds no $TORCH_WHEEL"
[ -z "$CA_BUNDLE" ] || [ -f "$CA_BUNDLE" ] || fail "CA_BUNDLE=$CA_BUNDLE is not a file"

declare -A TAGS=([search]=cirflow-search [flows]=cirflow-flows [ray-worker]=cirflow-ray)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(search flows ray-worker)
for name in "${names[@]}"; do
  [ -n "${TAGS[$name]:-}" ] || fail "no image named '$name' (one of: search flows ray-worker)"
done

mounts=()
[ -z "$CA_BUNDLE" ] || mounts+=(-v "$(realpath "$CA_BUNDLE"):/etc/ssl/certs/ca-certificates.crt:ro")

base() {
  if buildah inspect --type image "$BASE" >/dev/null 2>&1; then return; fi
  [ "$BASE" = localhost/cirflow-python:3.11 ] || fail "base image $BASE is not in buildah's storage"
  command -v mmdebstrap >/dev/null || fail "the base image needs mmdebstrap (Debian/Ubuntu: apt-get install mmdebstrap)"
  local context start
  start=$(date +%s)
  context=$(mktemp -d)
  trap 'rm -rf "$context"' RETURN
  # Debian's slim images leave out man pages, translations and docs (copyrights kept) the same way.
  mmdebstrap --quiet --variant=minbase --include=python3.11,python3.11-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    bookworm "$context/rootfs.tar"
  buildah bud --quiet -t "$BASE" -f deploy/docker/python-base.Dockerfile "$context" >/dev/null
  report "$BASE" $(($(date +%s) - start))
}

report() { printf '%s\t%s\t%d s\n' "$1" "$(buildah images --format '{{.Size}}' "$1")" "$2"; }

# One command per image, run once in a fresh container of it: the CLI's entry point loads, and each image holds
# what it is for (the search image none of torch, Ray and Prefect).
smoke() {
  case $1 in
    search) echo 'cirflow --help >/dev/null && python -c "import importlib.util as u, sys;
bad = [m for m in (\"torch\", \"ray\", \"prefect\") if u.find_spec(m)]; sys.exit(f\"holds {bad}\" if bad else 0)"' ;;
    flows) echo 'cirflow --help >/dev/null && prefect version >/dev/null && python -c "import torch, cirflow.models.backbones"' ;;
    ray-worker) echo 'cirflow --help >/dev/null && ray --version >/dev/null && command -v wget >/dev/null && python -c "import torch, cirflow.models.backbones"' ;;
  esac
}

base
for name in "${names[@]}"; do
  image=localhost/${TAGS[$name]}:$TAG
  args=(--build-arg "BASE=$BASE")
  if [ "$name" != search ] && [ -n "$WHEELS" ]; then
    args+=(-v "$(realpath "$WHEELS"):/wheels:ro" --build-arg WHEELS=/wheels)
  fi
  start=$(date +%s)
  buildah bud --quiet --layers "${mounts[@]}" "${args[@]}" -t "$image" -f "deploy/docker/$name.Dockerfile" . \
    >/dev/null || fail "building $image failed (its output is above)"
  seconds=$(($(date +%s) - start))
  container=$(buildah from --quiet "$image")
  buildah run "$container" -- sh -c "$(smoke "$name")" || { buildah rm "$container" >/dev/null;
    fail "$image: its smoke run failed"; }
  buildah rm "$container" >/dev/null
  report "$image" "$seconds"
done
# The images the rebuilds replaced (untagged, no children); the layers the tags use stay as the cache.
buildah rmi --prune >/dev/null 2>&1 || true
