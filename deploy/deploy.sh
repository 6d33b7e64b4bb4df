#!/usr/bin/env bash
# Deploy gemma-batch to Cloud Run: APIs, Artifact Registry, bucket, service accounts and IAM, the GPU
# image (Cloud Build), the service (service.yaml), the re-embedding job (job.yaml), Pub/Sub (topic,
# dead-letter topic, push or pull subscription) and the nightly Cloud Scheduler trigger
# (deploy/scheduler.yaml). Safe to run again: what exists is kept or updated in place.
#
#   deploy/deploy.sh --project my-project --dry-run     # print every command, run nothing
#   deploy/deploy.sh --project my-project               # do it
#
# Every setting is a flag or an environment variable (flag wins); see --help. Names that the specs
# fix (service, job, service accounts, push audience, schedule) are read from the YAML files, so the
# specs stay the one source of truth.
set -euo pipefail
shopt -u patsub_replacement 2>/dev/null || true # `&` in a substituted value stays literal (bash 5.2)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<EOF
Usage: deploy/deploy.sh [options]

  --project ID          Google Cloud project (env PROJECT_ID; else gcloud's configured project)
  --region REGION       Cloud Run, Artifact Registry and bucket region (env REGION; default europe-west1)
  --bucket NAME         results, nodes and models bucket (env BUCKET; default PROJECT-gemma-batch)
  --topic NAME          task topic (env TOPIC; default gemma-tasks)
  --delivery push|pull  push: a push subscription to the service (scales to zero; default);
                        pull: a pull subscription and a GPU worker pool running cli.py worker
                        (env DELIVERY)
  --model-source SRC    model baked into the image at build time (env MODEL_SOURCE; default
                        embedded; '' bakes none: set GEMMA_BATCH_MODEL on the service instead)
  --tag TAG             image tag (env TAG; default a UTC timestamp)
  --skip-build          deploy an image tag that was built before (needs --tag)
  --publisher MEMBER    also grant roles/pubsub.publisher on the topic, e.g. serviceAccount:agents@...
                        (env PUBLISHER)
  --render-dir DIR      keep the rendered service, job and scheduler specs in DIR
  --dry-run             print every command, run nothing (no gcloud needed)
  -h, --help            this text
EOF
}

PROJECT_ID="${PROJECT_ID:-${GOOGLE_CLOUD_PROJECT:-}}"
REGION="${REGION:-europe-west1}"
BUCKET="${BUCKET:-}"
TOPIC="${TOPIC:-gemma-tasks}"
DELIVERY="${DELIVERY:-push}"
MODEL_SOURCE="${MODEL_SOURCE-embedded}"
TAG="${TAG:-}"
PUBLISHER="${PUBLISHER:-}"
AR_REPO="${AR_REPO:-gemma-batch}"
RENDER_DIR=""
SKIP_BUILD=0
DRY_RUN=0

die() { echo "deploy.sh: $*" >&2; exit 2; }

while (($#)); do
  case "$1" in
    --project) PROJECT_ID="${2:?--project needs a value}"; shift 2 ;;
    --region) REGION="${2:?--region needs a value}"; shift 2 ;;
    --bucket) BUCKET="${2:?--bucket needs a value}"; shift 2 ;;
    --topic) TOPIC="${2:?--topic needs a value}"; shift 2 ;;
    --delivery) DELIVERY="${2:?--delivery needs push or pull}"; shift 2 ;;
    --model-source) MODEL_SOURCE="${2?--model-source needs a value}"; shift 2 ;;
    --tag) TAG="${2:?--tag needs a value}"; shift 2 ;;
    --skip-build) SKIP_BUILD=1; shift ;;
    --publisher) PUBLISHER="${2:?--publisher needs a member}"; shift 2 ;;
    --render-dir) RENDER_DIR="${2:?--render-dir needs a directory}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done

[[ "$DELIVERY" == push || "$DELIVERY" == pull ]] || die "--delivery must be push or pull, got '$DELIVERY'"
((SKIP_BUILD == 0)) || [[ -n "$TAG" ]] || die "--skip-build needs --tag of an image built before"
if ((DRY_RUN == 0)); then
  command -v gcloud >/dev/null || die "gcloud is not on PATH: install the Google Cloud CLI, or use --dry-run"
  [[ -n "$PROJECT_ID" ]] || PROJECT_ID="$(gcloud config get-value project 2>/dev/null || true)"
  [[ -n "$PROJECT_ID" ]] || die "no project: pass --project or set PROJECT_ID"
fi
PROJECT_ID="${PROJECT_ID:-my-project}"
BUCKET="${BUCKET:-${PROJECT_ID}-gemma-batch}"
TAG="${TAG:-$(date -u +%Y%m%d-%H%M%S)}"

# ---- printing and running --------------------------------------------------------------------

quoted() {
  local out=() arg
  for arg in "$@"; do out+=("$(printf '%q' "$arg")"); done
  printf '%s' "${out[*]}"
}

step() { printf '\n== %s\n' "$*"; }

# run CMD...: print it, then run it unless this is a dry run.
run() {
  printf '+ %s\n' "$(quoted "$@")"
  ((DRY_RUN)) || "$@"
}

# try CMD...: like run, but a failure is expected and ignored (removing a binding that may not exist).
try() {
  printf '+ %s || true\n' "$(quoted "$@")"
  ((DRY_RUN)) || "$@" >/dev/null 2>&1 || true
}

# split_at_dashes ARGS...: the words before the first `--` go to FIRST, the rest to REST.
split_at_dashes() {
  FIRST=() REST=()
  while (($#)) && [[ "$1" != -- ]]; do FIRST+=("$1"); shift; done
  (($#)) && shift
  REST=("$@")
}

# ensure DESCRIBE... -- CREATE...: create only what does not exist yet.
ensure() {
  split_at_dashes "$@"
  local describe=("${FIRST[@]}") create=("${REST[@]}")
  printf '+ %s >/dev/null 2>&1 || %s\n' "$(quoted "${describe[@]}")" "$(quoted "${create[@]}")"
  ((DRY_RUN)) || "${describe[@]}" >/dev/null 2>&1 || "${create[@]}"
}

# upsert DESCRIBE... -- CREATE... -- UPDATE...: create it, or bring an existing one up to date.
upsert() {
  split_at_dashes "$@"
  local describe=("${FIRST[@]}")
  split_at_dashes "${REST[@]}"
  local create=("${FIRST[@]}") update=("${REST[@]}")
  printf '+ if %s >/dev/null 2>&1; then %s; else %s; fi\n' \
    "$(quoted "${describe[@]}")" "$(quoted "${update[@]}")" "$(quoted "${create[@]}")"
  ((DRY_RUN)) && return 0
  if "${describe[@]}" >/dev/null 2>&1; then "${update[@]}"; else "${create[@]}"; fi
}

# capture VAR PLACEHOLDER CMD...: set VAR to what CMD prints; a dry run uses PLACEHOLDER instead.
capture() {
  local var="$1" placeholder="$2"
  shift 2
  # shellcheck disable=SC2016 # the $( ) is printed, not run
  printf '+ %s=$(%s)\n' "$var" "$(quoted "$@")"
  if ((DRY_RUN)); then
    printf -v "$var" '%s' "$placeholder"
  else
    printf -v "$var" '%s' "$("$@")"
  fi
}

# ---- reading the specs -----------------------------------------------------------------------

# yaml_value FILE KEY: the first `KEY: value` in FILE, without quotes.
yaml_value() {
  local value
  value="$(sed -n -E "/^[[:space:]-]*$2:[[:space:]]/{s/^[[:space:]-]*$2:[[:space:]]*//p;q;}" "$1")"
  value="${value%\"}"
  value="${value#\"}"
  printf '%s' "$value"
}

# yaml_env FILE NAME: the value of the container environment variable NAME.
yaml_env() {
  awk -v name="$2" '$0 ~ "- name: " name "$" { getline; sub(/^[[:space:]]*value:[[:space:]]*/, ""); gsub(/"/, ""); print; exit }' "$1"
}

# metadata_name FILE: metadata.name of a Knative-style spec.
metadata_name() {
  awk '/^metadata:/ { m = 1; next } m && /^  name:/ { print $2; exit }' "$1"
}

# render SRC DEST: the checked-in spec with this deployment's image, project, bucket and region.
render() {
  local text
  text="$(<"$1")"
  text="${text//"$IMAGE_PLACEHOLDER"/$IMAGE_REF}"
  text="${text//PROJECT/$PROJECT_ID}"
  text="${text//BUCKET/$BUCKET}"
  text="${text//europe-west1/$REGION}"
  printf '%s\n' "$text" >"$2"
}

IMAGE_PLACEHOLDER="$(yaml_value "$ROOT/service.yaml" image)"
IMAGE_NAME="${IMAGE_PLACEHOLDER##*/}"
IMAGE_NAME="${IMAGE_NAME%%:*}"
IMAGE="${REGION}-docker.pkg.dev/${PROJECT_ID}/${AR_REPO}/${IMAGE_NAME}"
IMAGE_REF="${IMAGE}:${TAG}"

KEEP_RENDERED="$RENDER_DIR"
if [[ -z "$RENDER_DIR" ]]; then
  RENDER_DIR="$(mktemp -d)"
  trap 'rm -rf "$RENDER_DIR"' EXIT
fi
RENDER_DIR="$(mkdir -p "$RENDER_DIR" && cd "$RENDER_DIR" && pwd)"
# From here on paths are relative to the repository root, as the printed commands show them.
cd "$ROOT"
SERVICE_SPEC="$RENDER_DIR/service.yaml"
JOB_SPEC="$RENDER_DIR/job.yaml"
SCHEDULER_SPEC="$RENDER_DIR/scheduler.yaml"
render service.yaml "$SERVICE_SPEC"
render job.yaml "$JOB_SPEC"
render deploy/scheduler.yaml "$SCHEDULER_SPEC"
[[ -z "$KEEP_RENDERED" ]] || echo "rendered specs: $RENDER_DIR"

SERVICE="$(metadata_name "$SERVICE_SPEC")"
JOB="$(metadata_name "$JOB_SPEC")"
RUNTIME_SA="$(yaml_value "$SERVICE_SPEC" serviceAccountName)"
PUSH_SA="$(yaml_env "$SERVICE_SPEC" GEMMA_BATCH_PUSH_SERVICE_ACCOUNT)"
PUSH_AUDIENCE="$(yaml_env "$SERVICE_SPEC" GEMMA_BATCH_PUSH_AUDIENCE)"
RESULTS="$(yaml_env "$SERVICE_SPEC" GEMMA_BATCH_RESULTS)"
JOB_SA="$(yaml_value "$JOB_SPEC" serviceAccountName)"
SCHEDULER_JOB="$(yaml_value "$SCHEDULER_SPEC" name)"
SCHEDULER_JOB="${SCHEDULER_JOB##*/}"
SCHEDULER_SA="$(yaml_value "$SCHEDULER_SPEC" serviceAccountEmail)"
DEAD_LETTER_TOPIC="${TOPIC}-dead-letter"
PUSH_SUBSCRIPTION="${TOPIC}-push"
PULL_SUBSCRIPTION="${TOPIC}-pull"
WORKER_POOL="${SERVICE}-worker"
# Deliveries before Pub/Sub dead-letters a message; above GEMMA_BATCH_MAX_ATTEMPTS, so the app
# writes the task's error result first.
MAX_DELIVERY_ATTEMPTS=10
RETRY_FLAGS=(--min-retry-delay=10s --max-retry-delay=600s
  --dead-letter-topic="$DEAD_LETTER_TOPIC" --max-delivery-attempts="$MAX_DELIVERY_ATTEMPTS")

echo "project=$PROJECT_ID region=$REGION bucket=$BUCKET topic=$TOPIC delivery=$DELIVERY image=$IMAGE_REF"
((DRY_RUN)) && echo "dry run: every command is printed, none is run"
printf '+ export CLOUDSDK_CORE_PROJECT=%q\n' "$PROJECT_ID"
export CLOUDSDK_CORE_PROJECT="$PROJECT_ID"

# ---- 1. APIs ---------------------------------------------------------------------------------
step "1. Enable the APIs"
run gcloud services enable run.googleapis.com artifactregistry.googleapis.com cloudbuild.googleapis.com \
  pubsub.googleapis.com storage.googleapis.com cloudscheduler.googleapis.com iam.googleapis.com \
  iamcredentials.googleapis.com monitoring.googleapis.com
capture PROJECT_NUMBER PROJECT_NUMBER gcloud projects describe "$PROJECT_ID" --format='value(projectNumber)'
PUBSUB_AGENT="service-${PROJECT_NUMBER}@gcp-sa-pubsub.iam.gserviceaccount.com"

# ---- 2. Artifact Registry --------------------------------------------------------------------
step "2. Artifact Registry repository"
ensure gcloud artifacts repositories describe "$AR_REPO" --location="$REGION" \
  -- gcloud artifacts repositories create "$AR_REPO" --location="$REGION" --repository-format=docker \
  --description="gemma-batch GPU images"

# ---- 3. Bucket -------------------------------------------------------------------------------
step "3. Bucket for results, graph nodes, embeddings and models"
ensure gcloud storage buckets describe "gs://$BUCKET" \
  -- gcloud storage buckets create "gs://$BUCKET" --location="$REGION" --uniform-bucket-level-access

# ---- 4. Service accounts ---------------------------------------------------------------------
step "4. Service accounts"
for entry in "$RUNTIME_SA=gemma-batch service runtime" "$PUSH_SA=Pub/Sub push identity for gemma-batch" \
  "$JOB_SA=gemma-batch re-embedding job runtime" "$SCHEDULER_SA=starts the nightly re-embedding job"; do
  sa="${entry%%=*}"
  ensure gcloud iam service-accounts describe "$sa" \
    -- gcloud iam service-accounts create "${sa%%@*}" --display-name="${entry#*=}"
done

# ---- 5. Storage IAM --------------------------------------------------------------------------
step "5. Storage IAM: the service writes results, the job writes embeddings and moves latest"
run gcloud storage buckets add-iam-policy-binding "gs://$BUCKET" \
  --member="serviceAccount:$RUNTIME_SA" --role=roles/storage.objectAdmin
run gcloud storage buckets add-iam-policy-binding "gs://$BUCKET" \
  --member="serviceAccount:$JOB_SA" --role=roles/storage.objectUser

# ---- 6. Image --------------------------------------------------------------------------------
step "6. Build the GPU image on Cloud Build (Dockerfile.gpu)"
if ((SKIP_BUILD)); then
  echo "skipped (--skip-build): deploying $IMAGE_REF"
else
  run gcloud builds submit . --config=deploy/cloudbuild.yaml \
    --substitutions="_IMAGE=$IMAGE,_TAG=$TAG,_MODEL_SOURCE=$MODEL_SOURCE"
fi

# ---- 7. Service ------------------------------------------------------------------------------
step "7. Deploy the service ($SERVICE) from service.yaml; not public"
run gcloud run services replace "$SERVICE_SPEC" --region="$REGION"
try gcloud run services remove-iam-policy-binding "$SERVICE" --region="$REGION" \
  --member=allUsers --role=roles/run.invoker
run gcloud run services add-iam-policy-binding "$SERVICE" --region="$REGION" \
  --member="serviceAccount:$PUSH_SA" --role=roles/run.invoker
capture SERVICE_URL "https://${SERVICE}-${PROJECT_NUMBER}.${REGION}.run.app" \
  gcloud run services describe "$SERVICE" --region="$REGION" --format='value(status.url)'

# ---- 8. Job ----------------------------------------------------------------------------------
step "8. Deploy the re-embedding job ($JOB) from job.yaml"
run gcloud run jobs replace "$JOB_SPEC" --region="$REGION"

# ---- 9. Pub/Sub ------------------------------------------------------------------------------
step "9. Pub/Sub: topic, dead-letter topic, $DELIVERY subscription"
ensure gcloud pubsub topics describe "$TOPIC" -- gcloud pubsub topics create "$TOPIC"
ensure gcloud pubsub topics describe "$DEAD_LETTER_TOPIC" -- gcloud pubsub topics create "$DEAD_LETTER_TOPIC"
# A dead-lettered message is kept only if some subscription holds it: this one is for inspection.
ensure gcloud pubsub subscriptions describe "${DEAD_LETTER_TOPIC}-hold" \
  -- gcloud pubsub subscriptions create "${DEAD_LETTER_TOPIC}-hold" --topic="$DEAD_LETTER_TOPIC" \
  --message-retention-duration=7d
# Pub/Sub's own service agent forwards to the dead-letter topic and signs the push tokens.
run gcloud beta services identity create --service=pubsub.googleapis.com
run gcloud pubsub topics add-iam-policy-binding "$DEAD_LETTER_TOPIC" \
  --member="serviceAccount:$PUBSUB_AGENT" --role=roles/pubsub.publisher
if [[ -n "$PUBLISHER" ]]; then
  run gcloud pubsub topics add-iam-policy-binding "$TOPIC" --member="$PUBLISHER" --role=roles/pubsub.publisher
fi

if [[ "$DELIVERY" == push ]]; then
  run gcloud iam service-accounts add-iam-policy-binding "$PUSH_SA" \
    --member="serviceAccount:$PUBSUB_AGENT" --role=roles/iam.serviceAccountTokenCreator
  # The service answers a push once the task's result is written, so the ack deadline is the
  # service's request timeout (service.yaml timeoutSeconds).
  PUSH_FLAGS=(--push-endpoint="$SERVICE_URL/pubsub/push" --push-auth-service-account="$PUSH_SA"
    --push-auth-token-audience="$PUSH_AUDIENCE" --ack-deadline=600 "${RETRY_FLAGS[@]}")
  upsert gcloud pubsub subscriptions describe "$PUSH_SUBSCRIPTION" \
    -- gcloud pubsub subscriptions create "$PUSH_SUBSCRIPTION" --topic="$TOPIC" "${PUSH_FLAGS[@]}" \
    -- gcloud pubsub subscriptions update "$PUSH_SUBSCRIPTION" "${PUSH_FLAGS[@]}"
  run gcloud pubsub subscriptions add-iam-policy-binding "$PUSH_SUBSCRIPTION" \
    --member="serviceAccount:$PUBSUB_AGENT" --role=roles/pubsub.subscriber
else
  # The worker extends leases while it works, so a short ack deadline redelivers quickly after a crash.
  PULL_FLAGS=(--ack-deadline=60 "${RETRY_FLAGS[@]}")
  upsert gcloud pubsub subscriptions describe "$PULL_SUBSCRIPTION" \
    -- gcloud pubsub subscriptions create "$PULL_SUBSCRIPTION" --topic="$TOPIC" "${PULL_FLAGS[@]}" \
    -- gcloud pubsub subscriptions update "$PULL_SUBSCRIPTION" "${PULL_FLAGS[@]}"
  run gcloud pubsub subscriptions add-iam-policy-binding "$PULL_SUBSCRIPTION" \
    --member="serviceAccount:$PUBSUB_AGENT" --role=roles/pubsub.subscriber
  run gcloud pubsub subscriptions add-iam-policy-binding "$PULL_SUBSCRIPTION" \
    --member="serviceAccount:$RUNTIME_SA" --role=roles/pubsub.subscriber
  # A worker pool does not scale to zero: one L4 is billed for as long as it runs.
  run gcloud beta run worker-pools deploy "$WORKER_POOL" --region="$REGION" --image="$IMAGE_REF" \
    --service-account="$RUNTIME_SA" --command=python --args=cli.py,worker \
    --set-env-vars="GEMMA_BATCH_SUBSCRIPTION=projects/$PROJECT_ID/subscriptions/$PULL_SUBSCRIPTION,GEMMA_BATCH_RESULTS=$RESULTS,GEMMA_BATCH_LOG_LEVEL=INFO,GEMMA_BATCH_DEVICE=cuda" \
    --cpu=4 --memory=16Gi --gpu=1 --gpu-type=nvidia-l4 --no-gpu-zonal-redundancy --instances=1
fi

# ---- 10. Scheduler ---------------------------------------------------------------------------
step "10. Cloud Scheduler: run $JOB nightly (deploy/scheduler.yaml)"
run gcloud run jobs add-iam-policy-binding "$JOB" --region="$REGION" \
  --member="serviceAccount:$SCHEDULER_SA" --role=roles/run.invoker
SCHEDULER_FLAGS=(--location="$REGION"
  --schedule="$(yaml_value "$SCHEDULER_SPEC" schedule)"
  --time-zone="$(yaml_value "$SCHEDULER_SPEC" timeZone)"
  --uri="$(yaml_value "$SCHEDULER_SPEC" uri)"
  --http-method="$(yaml_value "$SCHEDULER_SPEC" httpMethod)"
  --oauth-service-account-email="$SCHEDULER_SA"
  --oauth-token-scope="$(yaml_value "$SCHEDULER_SPEC" scope)"
  --attempt-deadline="$(yaml_value "$SCHEDULER_SPEC" attemptDeadline)"
  --max-retry-attempts="$(yaml_value "$SCHEDULER_SPEC" retryCount)"
  --min-backoff="$(yaml_value "$SCHEDULER_SPEC" minBackoffDuration)"
  --max-backoff="$(yaml_value "$SCHEDULER_SPEC" maxBackoffDuration)"
  --description="$(yaml_value "$SCHEDULER_SPEC" description)")
upsert gcloud scheduler jobs describe "$SCHEDULER_JOB" --location="$REGION" \
  -- gcloud scheduler jobs create http "$SCHEDULER_JOB" "${SCHEDULER_FLAGS[@]}" \
  -- gcloud scheduler jobs update http "$SCHEDULER_JOB" "${SCHEDULER_FLAGS[@]}"

step "Done"
echo "service:  $SERVICE_URL  (callers need roles/run.invoker and an ID token)"
echo "topic:    projects/$PROJECT_ID/topics/$TOPIC  ($DELIVERY delivery; dead letters: $DEAD_LETTER_TOPIC)"
echo "results:  $RESULTS"
echo "submit:   python cli.py submit --project $PROJECT_ID --topic $TOPIC --kind embed --text hello --results $RESULTS --wait"
