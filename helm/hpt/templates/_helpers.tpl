{{/*
Chart name, truncated to 63 characters (the DNS label limit).
*/}}
{{- define "hpt.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: release name plus chart name unless the release name already holds it.
*/}}
{{- define "hpt.fullname" -}}
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
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "hpt.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels. Call with (dict "ctx" $ "component" "controller").
*/}}
{{- define "hpt.labels" -}}
helm.sh/chart: {{ include "hpt.chart" .ctx }}
{{ include "hpt.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: hpt
{{- end }}

{{/*
Selector labels: stable across upgrades (no version). Call with (dict "ctx" $ "component" "...").
*/}}
{{- define "hpt.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hpt.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
The hpt image.
*/}}
{{- define "hpt.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Names of the generated objects.
*/}}
{{- define "hpt.controllerAddress" -}}
{{- printf "%s-controller.%s.svc:%d" (include "hpt.fullname" .) .Release.Namespace (int .Values.controller.port) }}
{{- end }}
{{- define "hpt.authSecret" -}}
{{- default (printf "%s-auth" (include "hpt.fullname" .)) .Values.auth.existingSecret }}
{{- end }}
{{- define "hpt.caSecret" -}}
{{- default (printf "%s-ca" (include "hpt.fullname" .)) .Values.tls.existingCASecret }}
{{- end }}
{{- define "hpt.redisSecret" -}}
{{- if .Values.redis.enabled }}
{{- printf "%s-redis" (include "hpt.fullname" .) }}
{{- else }}
{{- .Values.redis.external.existingSecret }}
{{- end }}
{{- end }}
{{- define "hpt.redisPasswordKey" -}}
{{- if .Values.redis.enabled }}password{{ else }}{{ .Values.redis.external.passwordKey }}{{ end }}
{{- end }}

{{/*
Environment of the controller that yields HPT_REDIS_URL with the password from a Secret
(kubelet expands $(REDIS_PASSWORD); the password never appears in argv or in the manifest).
*/}}
{{- define "hpt.redisEnv" -}}
{{- $secret := include "hpt.redisSecret" . }}
{{- if $secret }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ include "hpt.redisPasswordKey" . }}
{{- end }}
- name: HPT_REDIS_URL
{{- if .Values.redis.enabled }}
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s-redis.%s.svc:6379/0" (include "hpt.fullname" .) .Release.Namespace | quote }}
{{- else if $secret }}
  value: {{ regexReplaceAll "^(rediss?)://" .Values.redis.external.url "${1}://:$(REDIS_PASSWORD)@" | quote }}
{{- else }}
  value: {{ .Values.redis.external.url | quote }}
{{- end }}
{{- end }}

{{/*
Restricted container securityContext (Pod Security Standard "restricted").
*/}}
{{- define "hpt.restrictedContainer" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}
