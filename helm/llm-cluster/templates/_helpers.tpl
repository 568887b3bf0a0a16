{{/* Names and labels. */}}
{{- define "llm-cluster.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Short enough that KubeRay's suffixes (-head-svc, -serve-svc, -xxxxx cluster names) stay within 63. */}}
{{- define "llm-cluster.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else if contains (include "llm-cluster.name" .) .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "llm-cluster.name" .) | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "llm-cluster.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-cluster.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "llm-cluster.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "llm-cluster.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "llm-cluster.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "llm-cluster.apiServiceName" -}}
{{ include "llm-cluster.fullname" . }}-api
{{- end }}

{{/* Does any worker group have GPUs? ("true" or "") */}}
{{- define "llm-cluster.hasGPUs" -}}
{{- range .Values.workerGroups }}{{ if gt (int .gpus) 0 }}true{{ end }}{{ end }}
{{- end }}

{{/* Where the engine finds the weights: the LLMConfig's model.source. */}}
{{- define "llm-cluster.modelSource" -}}
{{- $m := .Values.model }}
{{- if eq $m.type "default" }}default
{{- else if eq $m.type "pvc" }}{{ printf "%s/%s" (trimSuffix "/" $m.pvc.mountPath) (trimPrefix "/" $m.pvc.path) | trimSuffix "/" }}
{{- else if eq $m.type "huggingface" }}{{ $m.huggingface.repoId }}
{{- else if eq $m.type "objectStore" }}{{ include "llm-cluster.objectStoreDir" . }}
{{- end }}
{{- end }}

{{- define "llm-cluster.objectStoreDir" -}}
{{ trimSuffix "/" .Values.modelCache.mountPath }}/object-store/{{ .Values.model.objectStore.uri | sha256sum | trunc 16 }}
{{- end }}

{{/* The object-store URI as an rclone on-the-fly remote: s3://b/p -> :s3:b/p. */}}
{{- define "llm-cluster.rcloneRemote" -}}
{{- $uri := .Values.model.objectStore.uri }}
{{- $scheme := regexFind "^[a-z0-9]+" $uri }}
{{- $remote := get (dict "s3" ":s3:" "gs" ":gcs:" "az" ":azureblob:") $scheme }}
{{- printf "%s%s" $remote (regexReplaceAll "^[a-z0-9]+://" $uri "") }}
{{- end }}

{{/* Environment of every Ray container: API keys, the Hub token and the model cache. */}}
{{- define "llm-cluster.env" -}}
- name: LLM_CLUSTER_CACHE
  value: {{ .Values.modelCache.mountPath | quote }}
{{- with .Values.api.apiKeys.existingSecret }}
- name: LLMCLUSTER_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.api.apiKeys.key }}
{{- end }}
{{- if and (eq .Values.model.type "huggingface") .Values.model.huggingface.tokenSecret.name }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.model.huggingface.tokenSecret.name }}
      key: {{ .Values.model.huggingface.tokenSecret.key }}
{{- end }}
{{- end }}

{{/* Ray's own health endpoint (raylet, and GCS on the head) on the dashboard agent; public under token auth. */}}
{{- define "llm-cluster.probes" -}}
startupProbe:
  httpGet: {path: /api/healthz, port: 52365}
  periodSeconds: 5
  failureThreshold: 60
readinessProbe:
  httpGet: {path: /api/healthz, port: 52365}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
livenessProbe:
  httpGet: {path: /api/healthz, port: 52365}
  periodSeconds: 15
  timeoutSeconds: 5
  failureThreshold: 4
{{- end }}

{{- define "llm-cluster.ports" -}}
- {name: serve, containerPort: {{ .Values.api.port }}}
- {name: metrics, containerPort: 8080}
- {name: llm-metrics, containerPort: {{ .Values.monitoring.metricsPort }}}
- {name: dashboard-agent, containerPort: 52365}
{{- end }}
