{{/* The chart's name, or nameOverride. */}}
{{- define "alignment-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-<chart> unless the release name already holds the chart name; fullnameOverride wins. */}}
{{- define "alignment-operator.fullname" -}}
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

{{- define "alignment-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "alignment-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "alignment-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "alignment-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "alignment-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "alignment-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "alignment-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "alignment-operator.trainerImage" -}}
{{- printf "%s:%s" .Values.trainer.image.repository (default .Chart.AppVersion .Values.trainer.image.tag) }}
{{- end }}

{{- define "alignment-operator.peeringName" -}}
{{- default .Release.Name .Values.peering.name }}
{{- end }}

{{/*
The rules the operator needs in every namespace it serves, derived from
operator/alignment_operator/kube.py (its only API client) and kopf's own calls for the
handlers in handlers.py (on.event only: kopf lists and watches, never patches them).
No wildcards, no secrets: stage pods reference Secrets by name, which needs no permission.
*/}}
{{- define "alignment-operator.namespacedRules" -}}
# AlignmentRuns: kopf lists and watches them (on.event); kube.get_run reads one.
- apiGroups: [alignment.dev]
  resources: [alignmentruns]
  verbs: [get, list, watch]
# kube.replace_status writes the status subresource (PUT with the resourceVersion read);
# kube.patch_stage_progress patches one stage's live progress (a JSON patch guarded by test ops).
- apiGroups: [alignment.dev]
  resources: [alignmentruns/status]
  verbs: [update, patch]
# Children carry an ownerReference with blockOwnerDeletion: true; clusters that enable the
# OwnerReferencesPermissionEnforcement admission plugin (e.g. OpenShift) require this for it.
- apiGroups: [alignment.dev]
  resources: [alignmentruns/finalizers]
  verbs: [update]
# Stage Jobs: kopf watches them (the operator's cache); list_children lists when the cache has
# not seen one yet; ensure_object creates;
# set_suspend patches spec.suspend; delete_children deletes.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [list, watch, create, patch, delete]
# Multi-node stages when JobSet or the Kubeflow Training Operator is installed: the same as Jobs.
- apiGroups: [jobset.x-k8s.io]
  resources: [jobsets]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [kubeflow.org]
  resources: [pytorchjobs]
  verbs: [list, watch, create, patch, delete]
# Stage pods: kopf watches them for termination messages; list_children lists them with the Jobs.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
# Recipe ConfigMaps and rendezvous Services: created per stage, deleted with the run's children.
- apiGroups: [""]
  resources: [configmaps, services]
  verbs: [list, create, delete]
# The run's volume from spec.storage.volumeClaimTemplate: created, never deleted (checkpoints stay).
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [create]
# kube.emit_event and kopf's own warnings about handler errors; kube.failed_create_events lists
# the FailedCreate Events of a stage Job that made no pod (a missing service account, a quota, ...).
- apiGroups: [""]
  resources: [events]
  verbs: [list, create]
{{- end }}

{{- /* controller._lacking_secrets: before a stage starts, the key names of the Secrets the run names, each
       read by name (get; never list or watch), none of their values kept, logged or written anywhere.
       rbac.checkSecrets: false leaves it out: a missing Secret then shows only when a pod cannot start. */}}
{{- define "alignment-operator.secretKeysRule" -}}
{{- if .Values.rbac.checkSecrets -}}
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
{{- end }}
{{- end }}
