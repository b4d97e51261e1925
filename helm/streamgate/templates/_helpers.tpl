{{/*
Names and labels.
*/}}
{{- define "streamgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "streamgate.fullname" -}}
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

{{- define "streamgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "streamgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "streamgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "streamgate.labels" -}}
helm.sh/chart: {{ include "streamgate.chart" . }}
{{ include "streamgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The pods the Services and the NetworkPolicy select: the chart's Deployment, or the
application pods the gateway is a sidecar of (podSelectorOverride).
*/}}
{{- define "streamgate.podSelector" -}}
{{- if .Values.podSelectorOverride }}
{{- toYaml .Values.podSelectorOverride }}
{{- else }}
{{- include "streamgate.selectorLabels" . }}
{{- end }}
{{- end }}

{{- define "streamgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "streamgate.redisSecretName" -}}
{{- if .Values.redis.existingSecret }}
{{- .Values.redis.existingSecret }}
{{- else }}
{{- printf "%s-redis" (include "streamgate.fullname" .) }}
{{- end }}
{{- end }}

{{/*
The gateway config file: .Values.config with the keys the chart owns filled in.
  server.listen          listen.host:listen.httpPort
  admin.listen           0.0.0.0:listen.adminPort (probes and Prometheus come over the pod IP)
  server.shutdown_grace  shutdown.graceSeconds
  server.drain_delay     shutdown.drainDelaySeconds
They come from values so that terminationGracePeriodSeconds can be computed from the same
numbers and the probes and Services can name the same ports; setting them under `config`
is an error rather than silently overridden.
tests/test_deploy.py mirrors this (render_gateway_config); keep the two in step.
*/}}
{{- define "streamgate.config" -}}
{{- $config := deepCopy (.Values.config | default (dict)) }}
{{- $server := get $config "server" | default (dict) }}
{{- $admin := get $config "admin" | default (dict) }}
{{- range $key := list "listen" "shutdown_grace" "drain_delay" }}
{{- if hasKey $server $key }}
{{- fail (printf "config.server.%s is set by the chart from listen.* and shutdown.*; set those values instead" $key) }}
{{- end }}
{{- end }}
{{- if hasKey $admin "listen" }}
{{- fail "config.admin.listen is set by the chart (0.0.0.0:listen.adminPort); set listen.adminPort instead" }}
{{- end }}
{{- $_ := set $server "listen" (printf "%s:%d" .Values.listen.host (int .Values.listen.httpPort)) }}
{{- $_ = set $server "shutdown_grace" (printf "%ds" (int .Values.shutdown.graceSeconds)) }}
{{- $_ = set $server "drain_delay" (printf "%ds" (int .Values.shutdown.drainDelaySeconds)) }}
{{- $_ = set $admin "listen" (printf "0.0.0.0:%d" (int .Values.listen.adminPort)) }}
{{- $_ = set $config "server" $server }}
{{- $_ = set $config "admin" $admin }}
{{- toYaml $config }}
{{- end }}

{{/*
The kubelet SIGKILLs a container terminationGracePeriodSeconds after the pod is deleted,
and the preStop hook runs inside that time: it must cover the hook, the drain delay, the
whole shutdown grace, and a margin for ending leftover streams and stopping workers.
*/}}
{{- define "streamgate.terminationGracePeriodSeconds" -}}
{{- add (int .Values.shutdown.preStopSleepSeconds) (int .Values.shutdown.drainDelaySeconds) (int .Values.shutdown.graceSeconds) (int .Values.shutdown.marginSeconds) }}
{{- end }}

{{/*
Env vars of the gateway container (list items, or nothing).
*/}}
{{- define "streamgate.env" -}}
{{- if or .Values.redis.existingSecret .Values.redis.url }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "streamgate.redisSecretName" . }}
      key: {{ .Values.redis.secretKey }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
