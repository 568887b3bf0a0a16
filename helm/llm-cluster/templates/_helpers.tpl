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

{{/* The `helm test` pod's own: the selector labels would put it under the PodDisruptionBudget, the
     NetworkPolicy's "release pods" rule and the PodMonitor. */}}
{{- define "llm-cluster.testSelectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-cluster.name" . }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* part-of is the chart's own name whatever nameOverride says: `llmcluster status --kubernetes` finds the
     RayService by it. */}}
{{- define "llm-cluster.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: {{ .Chart.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "llm-cluster.labels" -}}
{{ include "llm-cluster.selectorLabels" . }}
{{ include "llm-cluster.commonLabels" . }}
{{- end }}

{{- define "llm-cluster.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* What the project's code says (files/project-defaults.yaml, written by scripts/gen_chart_schema.py): the
     defaults the templates need before the application validates its arguments. Parse with fromYaml. */}}
{{- define "llm-cluster.projectDefaults" -}}
{{ .Files.Get "files/project-defaults.yaml" | required "the chart's files/project-defaults.yaml is missing: run scripts/gen_chart_schema.py" }}
{{- end }}

{{/* The port of Serve's HTTP proxy in every pod: llm.server.port, else the project's default. */}}
{{- define "llm-cluster.apiPort" -}}
{{- $server := (.Values.llm | default dict).server | default dict }}
{{- if hasKey $server "port" }}{{ $server.port }}{{ else }}{{ (include "llm-cluster.projectDefaults" . | fromYaml).server.port }}{{ end }}
{{- end }}

{{/* The Serve application's name: llm.server.app_name, else the project's default. */}}
{{- define "llm-cluster.appName" -}}
{{- $server := (.Values.llm | default dict).server | default dict }}
{{- $server.app_name | default (include "llm-cluster.projectDefaults" . | fromYaml).server.app_name }}
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
{{- /* RAY_NODE_ENV of cluster/ray_settings.py, through files/project-defaults.yaml: no idle task workers kept */}}
{{- range $name, $value := (include "llm-cluster.projectDefaults" . | fromYaml).ray_node_env }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
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
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* A Kubernetes quantity (512Mi, 48Gi, 1.5G, 1000000) in bytes, as an integer. */}}
{{- define "llm-cluster.bytes" -}}
{{- $q := toString . }}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $q }}
{{- $units := dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 }}
{{- $unit := trimPrefix $number $q }}
{{- if or (not $number) (not (hasKey $units $unit)) }}
{{- fail (printf "%q is not a memory or storage quantity this chart reads (like 512Mi, 48Gi or 1G)" $q) }}
{{- end }}
{{- mulf (float64 $number) (get $units $unit) | floor | int64 }}
{{- end }}

{{/* KubeRay finds the Serve proxy by the port named "serve": its default worker readiness probe checks the
     proxy's /-/healthz there, so a pod gets API traffic only while its proxy is healthy. */}}
{{- define "llm-cluster.ports" -}}
- {name: serve, containerPort: {{ include "llm-cluster.apiPort" . }}}
- {name: metrics, containerPort: 8080}
- {name: llm-metrics, containerPort: {{ .Values.monitoring.metricsPort }}}
- {name: dashboard-agent, containerPort: 52365}
{{- end }}
