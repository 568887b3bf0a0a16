{{/* Pod-level fields shared by head and workers. `pod` holds the pod's own values (head or a worker group):
     nodeSelector, tolerations, affinity, topologySpreadConstraints and the optional overrides of
     priorityClassName and runtimeClassName. Only the head's autoscaler sidecar talks to the Kubernetes API,
     so only it gets a token; `serviceAccountName` still names the pods' identity (workload identity for
     object stores works without a mounted token). */}}
{{- define "llm-cluster.podSpecCommon" -}}
{{- $root := .root }}
{{- $pod := .pod }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
automountServiceAccountToken: {{ .apiAccess }}
{{- with $pod.priorityClassName | default $root.Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $pod.runtimeClassName | default $root.Values.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with $root.Values.schedulerName }}
schedulerName: {{ . }}
{{- end }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with $pod.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $pod.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if or $pod.affinity $pod.spreadAcrossNodes }}
affinity:
  {{- $affinity := deepCopy ($pod.affinity | default dict) }}
  {{- if $pod.spreadAcrossNodes }}
  {{- /* one pod of the group per node, counting only this release's pods of the group */}}
  {{- $anti := $affinity.podAntiAffinity | default dict }}
  {{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" (include "llm-cluster.workerSelector" (dict "root" $root "group" $pod.name) | fromYaml)) }}
  {{- $_ := set $anti "requiredDuringSchedulingIgnoredDuringExecution" (append ($anti.requiredDuringSchedulingIgnoredDuringExecution | default list) $term) }}
  {{- $_ := set $affinity "podAntiAffinity" $anti }}
  {{- end }}
  {{- toYaml $affinity | nindent 2 }}
{{- end }}
{{- with $pod.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Labels of the pod template: the release's selector labels, the role, and the extra pod labels. */}}
{{- define "llm-cluster.podMetadata" -}}
{{- $root := .root -}}
labels:
  {{- include "llm-cluster.selectorLabels" $root | nindent 2 }}
  app.kubernetes.io/component: {{ .component }}
  {{- with .group }}
  llm-cluster/worker-group: {{ . }}
  {{- end }}
  {{- with merge (deepCopy (.pod.podLabels | default dict)) ($root.Values.podLabels | default dict) }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with merge (deepCopy (.pod.podAnnotations | default dict)) ($root.Values.podAnnotations | default dict) }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The pods of one worker group of this release, by the labels KubeRay itself sets (ray.io/node-type and
     ray.io/group cannot be overridden by a pod template) and the release's own. */}}
{{- define "llm-cluster.workerSelector" -}}
{{ include "llm-cluster.selectorLabels" .root }}
ray.io/node-type: worker
ray.io/group: {{ .group }}
{{- end }}

{{/* Ray's object store per pod in bytes: rayStartParams' object-store-memory, else Ray's own default of
     30% of the container's memory (its limit, else its request). */}}
{{- define "llm-cluster.objectStoreBytes" -}}
{{- $params := .rayStartParams | default dict }}
{{- if hasKey $params "object-store-memory" }}
{{- index $params "object-store-memory" | int64 }}
{{- else }}
{{- $resources := .resources | default dict }}
{{- $memory := ($resources.limits | default dict).memory | default ($resources.requests | default dict).memory }}
{{- if not $memory }}
{{- fail (printf "%s: set resources.limits.memory (Ray sizes its object store and /dev/shm from it)" .what) }}
{{- end }}
{{- mulf (include "llm-cluster.bytes" $memory | float64) 0.3 | floor | int64 }}
{{- end }}
{{- end }}

{{/* Size of the in-memory /dev/shm in bytes: `sharedMemory`, else the object store plus 1 GiB for NCCL and
     torch. Below the object store Ray would put its objects on disk instead. */}}
{{- define "llm-cluster.shmBytes" -}}
{{- $store := include "llm-cluster.objectStoreBytes" . | int64 }}
{{- if .sharedMemory }}
{{- $shm := include "llm-cluster.bytes" .sharedMemory | int64 }}
{{- if lt $shm $store }}
{{- fail (printf "%s.sharedMemory (%s) is smaller than Ray's object store (%d bytes, 30%% of the memory limit unless rayStartParams.object-store-memory says otherwise): raise it, or leave it empty to size it from the object store" .what .sharedMemory $store) }}
{{- end }}
{{- $shm }}
{{- else }}
{{- add $store 1073741824 }}
{{- end }}
{{- end }}

{{/* ray start parameters of a pod: the user's rayStartParams; where they set none, the object store size (so it
     always fits /dev/shm) and RAY_START_PARAMS of cluster/ray_settings.py (through files/project-defaults.yaml); `extra` over all. */}}
{{- define "llm-cluster.rayStartParams" -}}
{{- $defaults := (include "llm-cluster.projectDefaults" .root | fromYaml).ray_start_params }}
{{- $params := merge (deepCopy (.rayStartParams | default dict)) (dict "object-store-memory" (include "llm-cluster.objectStoreBytes" . | toString)) $defaults }}
{{- range $key, $value := .extra }}
{{- $_ := set $params $key $value }}
{{- end }}
{{- toYaml $params }}
{{- end }}

{{/* Requests and limits of a Ray container: GPUs added to both, and ephemeral-storage requested for the
     writable emptyDirs it fills (/tmp, home, and the model cache when that is an emptyDir). */}}
{{- define "llm-cluster.rayResources" -}}
{{- $root := .root }}
{{- $resources := deepCopy .resources }}
{{- $requests := $resources.requests | default dict }}
{{- $limits := $resources.limits | default dict }}
{{- if gt (int (.gpus | default 0)) 0 }}
{{- $_ := set $requests "nvidia.com/gpu" (int .gpus) }}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpus) }}
{{- end }}
{{- $disk := add (include "llm-cluster.bytes" $root.Values.scratch.tmpSizeLimit | int64) (include "llm-cluster.bytes" $root.Values.scratch.homeSizeLimit | int64) }}
{{- if and .worker (eq $root.Values.modelCache.type "emptyDir") }}
{{- $disk = add $disk (include "llm-cluster.bytes" $root.Values.modelCache.emptyDir.sizeLimit | int64) }}
{{- end }}
{{- if not (hasKey $requests "ephemeral-storage") }}
{{- $_ := set $requests "ephemeral-storage" ($disk | toString) }}
{{- end }}
{{- $_ := set $resources "requests" $requests }}
{{- $_ := set $resources "limits" $limits }}
{{- toYaml $resources }}
{{- end }}

{{/* Volumes of every Ray pod: /dev/shm sized for the object store, and the writable /tmp and home folders
     (the root filesystem is read-only). */}}
{{- define "llm-cluster.scratchVolumes" -}}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ include "llm-cluster.shmBytes" . | quote }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .root.Values.scratch.tmpSizeLimit }}
- name: home
  emptyDir:
    sizeLimit: {{ .root.Values.scratch.homeSizeLimit }}
{{- with .root.Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "llm-cluster.scratchMounts" -}}
- {name: shm, mountPath: /dev/shm}
- {name: tmp, mountPath: /tmp}
- {name: home, mountPath: {{ .Values.scratch.homePath }}}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "llm-cluster.modelVolumes" -}}
- name: model-cache
{{- if eq .Values.modelCache.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.modelCache.pvc.existingClaim | default (printf "%s-model-cache" (include "llm-cluster.fullname" .)) }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.modelCache.emptyDir.sizeLimit }}
{{- end }}
{{- if eq .Values.model.type "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
{{- end }}
{{- end }}

{{/* The rclone environment of the model download: env auth for every backend, the S3 provider AWS, and the
     config file in the writable /tmp; model.objectStore.env overrides or adds (an S3-compatible store:
     RCLONE_S3_PROVIDER and RCLONE_S3_ENDPOINT). */}}
{{- define "llm-cluster.rcloneEnv" -}}
{{- $defaults := dict "RCLONE_S3_PROVIDER" "AWS" "RCLONE_S3_ENV_AUTH" "true" "RCLONE_GCS_ENV_AUTH" "true" "RCLONE_AZUREBLOB_ENV_AUTH" "true" "RCLONE_CONFIG" "/tmp/rclone.conf" }}
{{- range $name, $value := merge (deepCopy (.Values.model.objectStore.env | default dict)) $defaults }}
- {name: {{ $name }}, value: {{ $value | toString | quote }}}
{{- end }}
{{- end }}

{{/* Copies the object-store prefix into the model cache before Ray starts (rclone, env auth). */}}
{{- define "llm-cluster.modelDownload" -}}
{{- $store := .Values.model.objectStore }}
- name: model-download
  image: {{ $store.image }}
  args: [copy, --transfers=16, --checkers=16, {{ include "llm-cluster.rcloneRemote" . | quote }}, {{ include "llm-cluster.objectStoreDir" . | quote }}]
  env:
    {{- include "llm-cluster.rcloneEnv" . | nindent 4 }}
  {{- with $store.credentialsSecret }}
  envFrom:
    - secretRef:
        name: {{ . }}
  {{- end }}
  resources:
    {{- toYaml $store.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
  volumeMounts:
    - {name: model-cache, mountPath: {{ .Values.modelCache.mountPath }}}
    - {name: tmp, mountPath: /tmp}
    - {name: home, mountPath: {{ .Values.scratch.homePath }}}
{{- end }}
