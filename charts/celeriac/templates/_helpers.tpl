{{/*
Names. Worker Deployments are "<release>-<nameOverride>-<queue>" like the Dagster chart's
("<release>-celery-workers-<queue>"), truncated to 63 characters.
*/}}
{{- define "celeriac.workers.fullname" -}}
{{- printf "%s-%s" .Release.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "celeriac.fullname" -}}
{{- printf "%s-celeriac" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "celeriac.queue.fullname" -}}
{{- $root := index . 0 -}}{{- $queue := index . 1 -}}
{{- printf "%s-%s" (include "celeriac.workers.fullname" $root) ($queue.name | lower | replace "_" "-" | replace "." "-") | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "celeriac.serviceAccountName" -}}
{{- default (include "celeriac.fullname" .) .Values.global.serviceAccountName -}}
{{- end -}}

{{- define "celeriac.jobNamespace" -}}
{{- default .Release.Namespace .Values.jobNamespace -}}
{{- end -}}

{{- define "celeriac.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "celeriac.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: celeriac
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one queue's worker pods. */}}
{{- define "celeriac.queue.selector" -}}
{{- $root := index . 0 -}}{{- $queue := index . 1 -}}
app.kubernetes.io/name: celeriac
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: worker
celeriac.dev/queue: {{ $queue.name }}
{{- end -}}

{{/* The queue's concurrency: its own, else the shared default. */}}
{{- define "celeriac.queue.concurrency" -}}
{{- $root := index . 0 -}}{{- $queue := index . 1 -}}
{{- if $queue.concurrency }}{{ $queue.concurrency }}{{ else }}{{ $root.Values.concurrency }}{{ end -}}
{{- end -}}

{{/* Broker URL, as the Dagster chart's dagster.celery.broker_url. */}}
{{- define "celeriac.brokerUrl" -}}
{{- if .Values.redis.enabled -}}
  {{- if .Values.redis.brokerUrl -}}{{ .Values.redis.brokerUrl }}
  {{- else -}}
    {{- $host := required "redis.host is required when redis.enabled" .Values.redis.host -}}
    redis://{{ if .Values.redis.usePassword }}:{{ .Values.redis.password }}@{{ end }}{{ $host }}:{{ .Values.redis.port }}/{{ .Values.redis.brokerDbNumber }}
  {{- end -}}
{{- else if .Values.rabbitmq.enabled -}}
pyamqp://{{ .Values.rabbitmq.rabbitmq.username }}:{{ .Values.rabbitmq.rabbitmq.password }}@{{ default (printf "%s-rabbitmq" .Release.Name) .Values.rabbitmq.host }}:{{ .Values.rabbitmq.service.port }}//
{{- else -}}
{{- fail "generateCeleryConfigSecret needs a broker: enable rabbitmq or redis, or set generateCeleryConfigSecret=false and provide the Secret global.celeryConfigSecretName" -}}
{{- end -}}
{{- end -}}

{{/* Result backend URL, as the Dagster chart's dagster.celery.backend_url. */}}
{{- define "celeriac.backendUrl" -}}
{{- if .Values.redis.enabled -}}
  {{- if .Values.redis.backendUrl -}}{{ .Values.redis.backendUrl }}
  {{- else -}}
    {{- $host := required "redis.host is required when redis.enabled" .Values.redis.host -}}
    redis://{{ if .Values.redis.usePassword }}:{{ .Values.redis.password }}@{{ end }}{{ $host }}:{{ .Values.redis.port }}/{{ .Values.redis.backendDbNumber }}
  {{- end -}}
{{- else -}}
rpc://
{{- end -}}
{{- end -}}

{{/* The queue's celery YAML (Dagster's celery-config.yaml shape). */}}
{{- define "celeriac.queue.celeryYaml" -}}
{{- $root := index . 0 -}}{{- $queue := index . 1 -}}
execution:
  celery:
    broker:
      env: DAGSTER_CELERY_BROKER_URL
    backend:
      env: DAGSTER_CELERY_BACKEND_URL
    {{- $source := merge (deepCopy ($queue.configSource | default dict)) (deepCopy ($root.Values.configSource | default dict)) }}
    {{- if $source }}
    config_source:
      {{- toYaml $source | nindent 6 }}
    {{- end }}
{{- end -}}

{{/* PDB / HPA API versions: the stable ones where the cluster serves them (1.21+ / 1.23+). */}}
{{- define "celeriac.pdb.apiVersion" -}}
{{- if .Values.apiVersionOverrides.podDisruptionBudget -}}{{ .Values.apiVersionOverrides.podDisruptionBudget }}
{{- else if .Capabilities.APIVersions.Has "policy/v1" -}}policy/v1{{- else -}}policy/v1beta1{{- end -}}
{{- end -}}

{{- define "celeriac.hpa.apiVersion" -}}
{{- if .Values.apiVersionOverrides.horizontalPodAutoscaler -}}{{ .Values.apiVersionOverrides.horizontalPodAutoscaler }}
{{- else if .Capabilities.APIVersions.Has "autoscaling/v2" -}}autoscaling/v2{{- else -}}autoscaling/v2beta2{{- end -}}
{{- end -}}

{{/*
The run coordinator (`celeriac coordinator`): "<release>-celeriac-coordinator", its own service account
(no Kubernetes API access), the worker image unless `coordinator.image` says otherwise.
*/}}
{{- define "celeriac.coordinator.fullname" -}}
{{- printf "%s-coordinator" (include "celeriac.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "celeriac.coordinator.serviceAccountName" -}}
{{- if .Values.coordinator.serviceAccount.create -}}
{{- default (include "celeriac.coordinator.fullname" .) .Values.coordinator.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.coordinator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "celeriac.coordinator.image" -}}
{{- $image := .Values.coordinator.image -}}
{{- printf "%s:%s" (default .Values.image.repository $image.repository) (coalesce $image.tag .Values.image.tag .Chart.AppVersion) -}}
{{- end -}}

{{/* Selector labels of the coordinator pods. */}}
{{- define "celeriac.coordinator.selector" -}}
app.kubernetes.io/name: celeriac
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: coordinator
{{- end -}}

{{/* The Prometheus job of the coordinator scrape (label celeriac.dev/job of its Service). */}}
{{- define "celeriac.coordinator.job" -}}
{{- include "celeriac.coordinator.fullname" . -}}
{{- end -}}

{{/*
Cross-field rules the schema cannot express; rendered (empty) by every coordinator template, so any of
them fails the release with the offending keys named.
*/}}
{{- define "celeriac.coordinator.validate" -}}
{{- $c := .Values.coordinator -}}
{{- if lt (int $c.leaseTimeoutSeconds) (mul 2 (int $c.heartbeatIntervalSeconds) | int) -}}
{{- fail (printf "coordinator.leaseTimeoutSeconds (%v) must be at least twice coordinator.heartbeatIntervalSeconds (%v): a lease must survive one missed renewal" $c.leaseTimeoutSeconds $c.heartbeatIntervalSeconds) -}}
{{- end -}}
{{- $min := $c.podDisruptionBudget.minAvailable -}}
{{- if and $c.podDisruptionBudget.enabled (gt (int $c.replicaCount) 1) (not (kindIs "string" $min)) (ge (int $min) (int $c.replicaCount)) -}}
{{- fail (printf "coordinator.podDisruptionBudget.minAvailable (%v) must be below coordinator.replicaCount (%v), or no coordinator pod could ever be evicted (node drains would hang)" $min $c.replicaCount) -}}
{{- end -}}
{{- end -}}
