{{/* The agent's objects are named <release>-node ("divert-node" for a release "divert"). */}}
{{- define "divert.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-node" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The DaemonSet's selector: immutable, so it never carries the chart's version. */}}
{{- define "divert.selectorLabels" -}}
app: {{ include "divert.fullname" . }}
{{- end -}}

{{- define "divert.labels" -}}
{{ include "divert.selectorLabels" . }}
app.kubernetes.io/name: divert
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "divert.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}
