{{/*
Chart name, truncated to the 63 characters a label value allows.
*/}}
{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name used as the prefix of every object: <release>-<chart>, or just <release> when the release
name already contains the chart name (`helm install finetune-operator ...` gives "finetune-operator").
*/}}
{{- define "finetune-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
helm.sh/chart label value.
*/}}
{{- define "finetune-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select the operator pod. Stable across upgrades: never add a value that changes.
*/}}
{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Standard labels on every object the chart renders. Note app.kubernetes.io/managed-by is "Helm" here;
the value "finetune-operator" is reserved for the training pods the operator creates (the PodMonitor
selects on it), so chart objects never carry it.
*/}}
{{- define "finetune-operator.labels" -}}
helm.sh/chart: {{ include "finetune-operator.chart" . }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: finetune-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Name of the operator's ServiceAccount.
*/}}
{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference from {repository, tag, digest}: repository@digest when a digest is given, else
repository:tag with the tag defaulting to the chart's appVersion. Call with (list $image $).
*/}}
{{- define "finetune-operator.imageRef" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/*
RBAC rules for objects that live in the namespaces of FineTuneJobs. Rendered into the ClusterRole
when all namespaces are watched, or into one Role per entry of watchNamespaces.
Each rule lists exactly the verbs the operator uses; no wildcards.
*/}}
{{- define "finetune-operator.secretRules" -}}
# Validate that storage.credentialsSecret exists and has the expected keys, and read progress.json
# from the job's S3 output with it (values stay in memory: never logged, never in status).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}

{{/*
Everything the operator does in a namespace it serves, except reading Secrets (secretRules).
*/}}
{{- define "finetune-operator.namespacedRules" -}}
# The custom resources: watch them, patch for Kopf's finalizer and progress annotations, and delete
# a finished job once spec.runPolicy.ttlSecondsAfterFinished has passed; create: a FineTuneSweep's
# trials (patch also suspends a pruned trial).
- apiGroups: ["finetune.io"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["finetune.io"]
  resources: ["finetunejobs/status"]
  verbs: ["get", "patch"]
# FineTuneSweeps: watched, patched by Kopf, their status written by the operator.
- apiGroups: ["finetune.io"]
  resources: ["finetunesweeps"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["finetune.io"]
  resources: ["finetunesweeps/status"]
  verbs: ["get", "patch"]
# The training group: one indexed batch Job per FineTuneJob; patched to set spec.suspend.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Headless Service for torchrun rendezvous and the ConfigMap holding the rendered job config.
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "delete"]
# Training pods: phases, exit codes and termination messages.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# One NetworkPolicy per FineTuneJob (trainer.networkPolicy.enabled): who may reach its pods.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create"]
# Kubernetes events on FineTuneJobs (Kopf posts through both APIs).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
RBAC rules that are cluster-scoped whatever is watched: Kopf scans CRDs and lists namespaces.
*/}}
{{- define "finetune-operator.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{/*
Checks the schema cannot express. Included from the Deployment so it runs on every render.
*/}}
{{- define "finetune-operator.validate" -}}
{{- if gt (int .Values.replicaCount) 1 }}
{{- fail "replicaCount: the operator runs standalone (no Kopf peering); use 1, or 0 to pause it" }}
{{- end }}
{{- if and .Values.rbac.credentialsNamespaces (or .Values.watchNamespaces .Values.rbac.clusterWideSecrets) }}
{{- fail "rbac.credentialsNamespaces needs watchNamespaces: [] and rbac.clusterWideSecrets: false (otherwise the operator already reads Secrets there)" }}
{{- end }}
{{- end }}

{{/*
A matchLabels map as the operator's FINETUNE_METRICS_FROM_NAMESPACES: key=value pairs, comma-separated,
sorted by key (so the Deployment does not change between renders).
*/}}
{{- define "finetune-operator.matchLabelsEnv" -}}
{{- $pairs := list }}
{{- range $k := keys . | sortAlpha }}
{{- $pairs = append $pairs (printf "%s=%s" $k (index $ $k)) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}
