#!/usr/bin/env bash
# Renders the Kubernetes manifests with kustomize and validates them against
# the Kubernetes schemas (strict: unknown fields are errors), and checks the
# sidecar's config with `tollgate check`. Then tests the Helm chart
# (tests/deploy: lint, render with Helm's engine, validate, `tollgate check`).
# Installs kubectl (Debian's kubernetes-client) when missing;
# kubernetes-validate, pytest and the Helm SDK come from the venv
# scripts/e2e.sh builds (tests/e2e/requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=1.33.0   # native sidecars (initContainers restartPolicy) need 1.29+
TOLLGATE_BIN=${TOLLGATE_BIN:-target/debug/tollgate}

if ! kubectl kustomize --help >/dev/null 2>&1; then
  echo "deploy-check: installing kubectl (kubernetes-client)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq kubernetes-client >/dev/null
fi
if [ ! -x .venv/bin/kubernetes-validate ]; then
  echo "deploy-check: .venv has no kubernetes-validate; run scripts/e2e.sh first" >&2
  exit 1
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
kubectl kustomize deploy/kubernetes/base > "$out/rendered.yaml"
.venv/bin/kubernetes-validate --strict --quiet -k "$K8S_VERSION" "$out/rendered.yaml"
grep -q "restartPolicy: Always" "$out/rendered.yaml"   # the native sidecar survived rendering
echo "deploy-check: manifests render and validate against Kubernetes $K8S_VERSION (strict)"

OPENAI_API_KEY=x ANTHROPIC_API_KEY=x TOLLGATE_ADMIN_TOKEN=x \
  "$TOLLGATE_BIN" check --config deploy/kubernetes/base/tollgate.toml

echo "deploy-check: Helm chart (deploy/helm/tollgate)"
case "$TOLLGATE_BIN" in /*) ;; *) TOLLGATE_BIN="$PWD/$TOLLGATE_BIN" ;; esac
PYTHONDONTWRITEBYTECODE=1 VIRTUAL_ENV="$PWD/.venv" TOLLGATE_BIN="$TOLLGATE_BIN" \
  .venv/bin/python -m pytest -q -p no:cacheprovider tests/deploy
