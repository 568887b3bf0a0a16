{{/* Checks the schema cannot express; each fails the render with the value to change. */}}
{{- define "llm-cluster.validate" -}}
{{- $m := .Values.model }}
{{- if not $m.type }}
{{- fail "model.type: no model source; set model.type to default, pvc, huggingface or objectStore, and that block's fields" }}
{{- end }}
{{- if and (eq $m.type "pvc") (or (not $m.pvc.claimName) (not $m.pvc.path)) }}
{{- fail "model.type is pvc: set model.pvc.claimName and model.pvc.path (the folder with config.json inside the claim)" }}
{{- end }}
{{- if and (eq $m.type "huggingface") (not $m.huggingface.repoId) }}
{{- fail "model.type is huggingface: set model.huggingface.repoId (like meta-llama/Llama-3.1-8B-Instruct)" }}
{{- end }}
{{- if and (eq $m.type "objectStore") (not (regexMatch "^(s3|gs|az)://[^/]+" $m.objectStore.uri)) }}
{{- fail "model.type is objectStore: set model.objectStore.uri to an s3://, gs:// or az:// bucket and prefix" }}
{{- end }}
{{- $defaults := include "llm-cluster.projectDefaults" . | fromYaml }}
{{- $parallel := (.Values.llm | default dict).parallel | default dict }}
{{- $tp := int ($parallel.tensor_parallel | default $defaults.parallel.tensor_parallel) }}
{{- range .Values.workerGroups }}
{{- if and (gt (int .gpus) 0) (lt (int .gpus) $tp) }}
{{- fail (printf "llm.parallel.tensor_parallel=%d does not fit worker group %q: its pods have %d GPUs (workerGroups[].gpus), and one tensor-parallel group must fit on one node" $tp .name (int .gpus)) }}
{{- end }}
{{- if gt (int .minReplicas) (int .maxReplicas) }}
{{- fail (printf "worker group %q: minReplicas (%d) is above maxReplicas (%d)" .name (int .minReplicas) (int .maxReplicas)) }}
{{- end }}
{{- end }}
{{- if and .Values.monitoring.podMonitor.enabled .Values.networkPolicy.enabled (not .Values.networkPolicy.metricsFrom) }}
{{- fail "monitoring.podMonitor.enabled: the NetworkPolicy lets no one scrape the pods; set networkPolicy.metricsFrom to your Prometheus (like [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}])" }}
{{- end }}
{{- $auth := (((.Values.llm | default dict).server | default dict).auth | default dict) }}
{{- if and $auth.require_api_key (not .Values.api.apiKeys.existingSecret) (not $auth.api_keys_file) }}
{{- fail "llm.server.auth.require_api_key: no keys to accept; set api.apiKeys.existingSecret (a Secret with comma-separated keys)" }}
{{- end }}
{{- if and .Values.gcsFaultTolerance.enabled (not .Values.gcsFaultTolerance.redisAddress) }}
{{- fail "gcsFaultTolerance.enabled needs gcsFaultTolerance.redisAddress (host:port of an external Redis, or redis:// / rediss:// URL)" }}
{{- end }}
{{- /* One replica is pipeline_parallel stages of tensor_parallel GPUs, each stage inside one pod: the GPU groups
     at their maxReplicas must hold min_replicas replicas' stages. */}}
{{- $pp := int ($parallel.pipeline_parallel | default $defaults.parallel.pipeline_parallel) }}
{{- $replicas := int ((((.Values.llm | default dict).server | default dict).min_replicas) | default 1) }}
{{- $slots := 0 }}
{{- $gpuGroups := 0 }}
{{- range .Values.workerGroups }}
{{- if gt (int .gpus) 0 }}
{{- $gpuGroups = add1 $gpuGroups }}
{{- $slots = add $slots (mul (div (int .gpus) $tp) (int .maxReplicas)) }}
{{- end }}
{{- end }}
{{- if and $gpuGroups (lt (int $slots) (mul $pp $replicas)) }}
{{- fail (printf "the GPU worker groups hold %d stage(s) of tensor_parallel=%d GPUs at their maxReplicas; llm.server.min_replicas=%d replica(s) of pipeline_parallel=%d need %d: raise workerGroups[].maxReplicas or gpus" (int $slots) $tp $replicas $pp (mul $pp $replicas)) }}
{{- end }}
{{- range .Values.workerGroups }}
{{- if and (not (kindIs "invalid" .minAvailable)) (ge (int .minAvailable) (int .minReplicas)) (gt (int .minAvailable) 0) }}
{{- fail (printf "workerGroups %q: minAvailable (%d) must stay below minReplicas (%d), or the PodDisruptionBudget blocks every node drain" .name (int .minAvailable) (int .minReplicas)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Seconds KubeRay keeps the old RayCluster after moving traffic to a new one: upgrade.clusterDeletionDelaySeconds,
     else the replicas' drain timeout (llm.server.autoscaling.drain_timeout_s) plus a minute, so streams finish. */}}
{{- define "llm-cluster.clusterDeletionDelay" -}}
{{- if not (kindIs "invalid" .Values.upgrade.clusterDeletionDelaySeconds) }}
{{- .Values.upgrade.clusterDeletionDelaySeconds }}
{{- else }}
{{- $defaults := include "llm-cluster.projectDefaults" . | fromYaml }}
{{- $autoscaling := (((.Values.llm | default dict).server | default dict).autoscaling | default dict) }}
{{- add (ceil ($autoscaling.drain_timeout_s | default $defaults.server.drain_timeout_s) | int) 60 }}
{{- end }}
{{- end }}

{{/* The application's arguments: the `llm` values (an LLMConfig) plus the fields the chart owns, and key
     checks on whenever a Secret brings keys. LLMConfig validation in the Serve application is the
     authority on everything else. */}}
{{- define "llm-cluster.llmArgs" -}}
{{- $args := deepCopy (.Values.llm | default dict) }}
{{- $model := $args.model | default dict }}
{{- $_ := set $model "source" (include "llm-cluster.modelSource" .) }}
{{- if and (include "llm-cluster.hasGPUs" .) (not $model.device) }}
{{- $_ := set $model "device" "cuda" }}
{{- end }}
{{- $_ := set $args "model" $model }}
{{- $server := $args.server | default dict }}
{{- $_ := set $server "host" "0.0.0.0" }}
{{- $_ := set $server "port" (int (include "llm-cluster.apiPort" .)) }}
{{- $_ := set $server "app_name" (include "llm-cluster.appName" .) }}
{{- $_ := set $server "metrics_port" .Values.monitoring.metricsPort }}
{{- if .Values.api.apiKeys.existingSecret }}
{{- $_ := set $server "auth" (merge (dict "require_api_key" true) ($server.auth | default dict)) }}
{{- end }}
{{- /* LLM replicas reserve a CPU (and, on CUDA alone, a GPU: the project's default) unless llm says
     otherwise: the head has num-cpus 0, so they go to worker pods, and the autoscaler adds pods for them */}}
{{- if not (hasKey $server "replica_cpus") }}
{{- $_ := set $server "replica_cpus" 1 }}
{{- end }}
{{- $_ := set $args "server" $server }}
{{- $parallel := $args.parallel | default dict }}
{{- if and .Values.autoscaler.enabled (not (hasKey $parallel "cluster_autoscales")) }}
{{- $_ := set $parallel "cluster_autoscales" true }}
{{- $_ := set $args "parallel" $parallel }}
{{- end }}
{{- toYaml $args }}
{{- end }}

{{/* The Ray Serve config (serveConfigV2). Replica counts, autoscaling and what a replica reserves come
     from the application itself (build_app reads llm.server). */}}
{{- define "llm-cluster.serveConfig" -}}
{{- $defaults := include "llm-cluster.projectDefaults" . | fromYaml }}
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: {{ include "llm-cluster.apiPort" . }}
# SERVE_CONTROLLER_ENV of serving/server/serve_env.py, through files/project-defaults.yaml
controller_options:
  runtime_env:
    env_vars:
      {{- toYaml $defaults.serve_controller_env | nindent 6 }}
applications:
  - name: {{ include "llm-cluster.appName" . }}
    route_prefix: /
    import_path: serving.server.deployments:build_app
    args:
      {{- include "llm-cluster.llmArgs" . | nindent 6 }}
    # The HTTP API replicas reserve CPU, so they run on worker pods (the head has num-cpus 0), and there are
    # api.replicas of them.
    deployments:
      - name: APIIngress
        num_replicas: {{ .Values.api.replicas }}
        ray_actor_options:
          num_cpus: {{ .Values.api.cpus }}
{{- end }}
