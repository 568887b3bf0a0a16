{{/* Pod-level fields shared by head and workers; `placement` holds nodeSelector, tolerations, affinity.
     Only the head's autoscaler sidecar talks to the Kubernetes API, so only it gets a token. */}}
{{- define "llm-cluster.podSpecCommon" -}}
{{- $root := .root }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
automountServiceAccountToken: {{ .apiAccess }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with .placement.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .placement.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .placement.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* A worker group's requests and limits, with its GPUs added to both. */}}
{{- define "llm-cluster.workerResources" -}}
{{- $resources := deepCopy .resources }}
{{- if gt (int .gpus) 0 }}
{{- $_ := set $resources.requests "nvidia.com/gpu" (int .gpus) }}
{{- $_ := set $resources.limits "nvidia.com/gpu" (int .gpus) }}
{{- end }}
{{- toYaml $resources }}
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

{{/* Copies the object-store prefix into the model cache before Ray starts (rclone, env auth). */}}
{{- define "llm-cluster.modelDownload" -}}
{{- $store := .Values.model.objectStore }}
- name: model-download
  image: {{ $store.image }}
  args: [copy, --transfers=16, --checkers=16, {{ include "llm-cluster.rcloneRemote" . | quote }}, {{ include "llm-cluster.objectStoreDir" . | quote }}]
  env:
    - {name: RCLONE_S3_PROVIDER, value: AWS}
    - {name: RCLONE_S3_ENV_AUTH, value: "true"}
    - {name: RCLONE_GCS_ENV_AUTH, value: "true"}
    - {name: RCLONE_AZUREBLOB_ENV_AUTH, value: "true"}
    - {name: RCLONE_CONFIG, value: /tmp/rclone.conf}
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
{{- end }}
