#!/usr/bin/env bash
# Register transferlab with a Prefect server: the work pool, the tag concurrency limit for heavy
# stages, and every deployment in prefect.yaml. Idempotent; run from anywhere.
#   PREFECT_API_URL=http://prefect:4200/api infra/bootstrap.sh
# Env: TRANSFERLAB_POOL (default local-process), TRANSFERLAB_POOL_TYPE (process | kubernetes),
#      TRANSFERLAB_HEAVY_LIMIT (concurrent heavy task runs, default 1),
#      TRANSFERLAB_BASE_JOB_TEMPLATE (a JSON file, e.g. infra/k8s/base-job-template.json).
set -euo pipefail
cd "$(dirname "$0")/.."
POOL="${TRANSFERLAB_POOL:-local-process}"
TYPE="${TRANSFERLAB_POOL_TYPE:-process}"
HEAVY="${TRANSFERLAB_HEAVY_LIMIT:-1}"

pool_args=(--type "$TYPE")
if [ -n "${TRANSFERLAB_BASE_JOB_TEMPLATE:-}" ]; then
  pool_args+=(--base-job-template "$TRANSFERLAB_BASE_JOB_TEMPLATE")
fi
if ! prefect work-pool inspect "$POOL" >/dev/null 2>&1; then
  prefect work-pool create "$POOL" "${pool_args[@]}"
fi
# Tasks tagged `heavy` (features, methods, attacks) wait for a slot, so a nightly run and an
# on-demand attack-eval do not oversubscribe one machine.
prefect concurrency-limit create heavy "$HEAVY"
if [ "$POOL" = local-process ]; then
  prefect --no-prompt deploy --all
else
  prefect --no-prompt deploy --all --pool "$POOL"
fi
