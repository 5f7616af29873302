#!/usr/bin/env bash
# `make test-images` (.ci/run calls it after `make test`): build the CPU image with podman and run the components in
# it: (a) the CLI and the imports, (b) the validate stage on tiny data mounted read-only, (c) the tiny DAG with
# every task in the image (kfp.local.DockerRunner against podman's Docker-compatible API) and a failing component,
# (d) the serving image of the champion (c) registered, answering prompts and rejecting malformed requests. A
# preflight first: where podman cannot start even a trivial container, it says so in one line and exits 0.
# Everything it makes lives under .tmp/images (podman's storage and config, the API socket, scratch) and is removed
# at exit, with its containers and the API service; KEEP=1 keeps the storage (the image) and BUILD=0 then reuses it.
# Needs root (podman with overlay storage and runc; rootless podman needs another storage setup).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$ROOT/.tmp/images
PY=$ROOT/.venv/bin/python
IMAGE=$(python3 components/image.py cpu)
BASE=python:3.11-slim-bookworm  # docker/Dockerfile.cpu's PYTHON_IMAGE
PODMAN_PACKAGES=(podman buildah runc mmdebstrap)
KEEP=${KEEP:-0}
BUILD=${BUILD:-1}
SERVICE_PID=
STEPS=()

step() {  # step NAME COMMAND...: run it, print and remember its time
    local name=$1 start=$SECONDS
    shift
    echo "== $name"
    "$@"
    STEPS+=("$(printf '%-44s %5d s' "$name" $((SECONDS - start)))")
    echo "== $name: $((SECONDS - start)) s"
}

cleanup() {
    local status=$?
    set +e
    if [ -n "$SERVICE_PID" ]; then kill "$SERVICE_PID" && wait "$SERVICE_PID" 2>/dev/null; fi
    if [ -f "$WORK/containers.conf" ]; then
        podman rm --all --force >/dev/null
        [ "$KEEP" = 1 ] || podman rmi --all --force >/dev/null
        echo "containers left: $(podman ps --all --quiet | wc -l)"
    fi
    if [ "$KEEP" = 1 ]; then
        rm -rf "$WORK/scratch" "$WORK/api.sock"
    else
        # overlay storage bind-mounts its own folder: unmount what lies under $WORK (deepest first), then remove it
        findmnt -rn -o TARGET | grep "^$WORK/" | sort -r | xargs -r umount
        rm -rf "$WORK"
        echo "mounts left under .tmp/images: $(findmnt -rn -o TARGET | grep -c "^$WORK/")"
    fi
    if [ ${#STEPS[@]} -gt 0 ]; then
        echo; echo "== make test-images: step times"; printf '%s\n' "${STEPS[@]}"
    fi
    exit $status
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "make test-images: needs root (podman with overlay storage and runc)" >&2; exit 1; }

install_podman() {
    local missing=()
    for tool in "${PODMAN_PACKAGES[@]}"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
    if [ ${#missing[@]} -eq 0 ]; then echo "present: ${PODMAN_PACKAGES[*]}"; return; fi
    echo "installing: ${missing[*]}"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PODMAN_PACKAGES[@]}" \
            >/dev/null; }; then
        echo "make test-images: SKIPPED, podman is missing here and could not be installed (${missing[*]})"
        exit 0
    fi
}

# Podman's config for this run: storage (overlay; vfs copies the whole image on every run) under $WORK, runc
# (crun fails here: "cgroups in hybrid mode not supported"), ulimits the VM allows (podman's default nofile of
# 1048576 fails: no CAP_SYS_RESOURCE).
configure_podman() {
    mkdir -p "$WORK/storage" "$WORK/run" "$WORK/tmp" "$WORK/scratch"
    cat > "$WORK/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$WORK/tmp"
CONF
    cat > "$WORK/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$WORK/storage"
runroot = "$WORK/run"
CONF
}

# The base image, or, when it cannot be pulled (no registry reachable), a stand-in of the same name: Debian
# bookworm with its Python 3.11 (mmdebstrap), which a FROM of that name then finds locally.
base_image() {
    if podman image exists "$BASE"; then echo "present: $BASE"; return; fi
    if podman pull --quiet "docker.io/library/$BASE"; then return; fi
    echo "cannot pull $BASE: making a local stand-in (Debian bookworm + python3, mmdebstrap)"
    mmdebstrap --quiet --variant=minbase \
        --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates bookworm "$WORK/rootfs.tar"
    podman import --quiet "$WORK/rootfs.tar" "localhost/$BASE"
    rm -f "$WORK/rootfs.tar"
}

# The same `make image-cpu` users run, with this machine's network knobs: its pip CA bundle (this network re-signs
# TLS) and its wheel folder, which holds the CPU torch wheel (the CPU torch index is unreachable here).
build_image() {
    local ca wheels torch_args=()
    ca=${PIP_CERT:-$("$PY" -m pip config get global.cert 2>/dev/null || true)}
    wheels=${PIP_FIND_LINKS:-$("$PY" -m pip config get global.find-links 2>/dev/null || true)}
    if compgen -G "$wheels/torch-*+cpu-*.whl" >/dev/null; then torch_args=(TORCH_INDEX_URL=); fi
    make -s image-cpu DOCKER=podman CA_BUNDLE="$ca" WHEELS="$wheels" "${torch_args[@]}" \
        BUILD_FLAGS="--network host --build-arg PYTHON_IMAGE=$BASE"
}

# Can podman start a container here at all? A trivial one, with no image (the host's /bin/true and its libraries as
# the root filesystem), then an image of those files built and run with the overlay storage the real build uses.
# Where it cannot (a sandbox without the kernel features podman needs), print podman's error and one line saying
# so, and skip the image tests: exit 0. Any failure after this one fails the run.
preflight() {
    local rootfs=$WORK/preflight-rootfs file=$WORK/preflight.Containerfile tag=localhost/alignpipe-preflight error
    mkdir -p "$rootfs"
    # shellcheck disable=SC2046  # ldd's paths: one word each
    cp --parents -L /bin/true $(ldd /bin/true | grep -o '/[^ ]*') "$rootfs/"
    printf 'FROM scratch\nCOPY . /\n' > "$file"
    # the container alone, then an image of it built and run with this run's (overlay) storage, as the build does
    if error=$(podman run --rm --network none --rootfs "$rootfs" /bin/true 2>&1) &&
            error=$(podman build --quiet --network none -t "$tag" -f "$file" "$rootfs" 2>&1) &&
            error=$(podman run --rm --network none "$tag" /bin/true 2>&1); then
        podman rmi --force "$tag" >/dev/null
        rm -rf "$rootfs" "$file"
        echo "podman built and started a trivial container (overlay storage, runc)"
        return 0
    fi
    printf '%s\n' "$error" >&2
    echo "make test-images: SKIPPED, podman cannot build or start a container on this machine: ${error##*$'\n'}"
    exit 0
}

start_service() {
    podman system service --time=0 "unix://$WORK/api.sock" &
    SERVICE_PID=$!
    for _ in $(seq 50); do [ -S "$WORK/api.sock" ] && return; sleep 0.2; done
    echo "podman system service did not start" >&2
    return 1
}

run_tests() {  # run_tests PYTEST_ARGS...: tests/test_containers.py against this run's image and API
    ALIGNPIPE_TEST_IMAGE=$IMAGE ALIGNPIPE_TEST_SCRATCH=$WORK/scratch DOCKER_HOST=unix://$WORK/api.sock \
        "$PY" -m pytest -q -s -p no:cacheprovider --basetemp="$WORK/scratch/pytest" tests/test_containers.py "$@"
}

main() {  # a function: bash reads it whole before running it, so editing this file during a run is harmless
    export CONTAINERS_CONF=$WORK/containers.conf CONTAINERS_STORAGE_CONF=$WORK/storage.conf
    step "install podman (when missing)" install_podman
    configure_podman
    step "preflight: podman starts a container" preflight
    if [ "$BUILD" = 1 ]; then
        step "base image (pull or stand-in)" base_image
        step "build $IMAGE" build_image
    fi
    echo "image size: $(podman image inspect --format '{{.Size}}' "$IMAGE" |
        awk '{printf "%.2f GB (%.0f bytes)", $1/1e9, $1}')"
    step "(a) CLI and imports in the image" run_tests -k "help or import or non_root"
    step "(b) validate stage in a container" run_tests -k validate
    start_service
    step "(c) tiny DAG, every task in the image" run_tests -k "dag or failing"
    step "(d) serving image of the tiny run's champion" run_tests -k serving
}

main
