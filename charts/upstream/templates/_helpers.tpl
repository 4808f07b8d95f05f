{{- define "upstream.labels" -}}
app.kubernetes.io/name: upstream
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "upstream.mlflowName" -}}
{{ .Release.Name }}-mlflow
{{- end -}}

{{- define "upstream.secretName" -}}
{{ .Values.s3.existingSecret | default "upstream-s3" }}
{{- end -}}

{{- define "upstream.trackingUri" -}}
{{- if .Values.mlflow.enabled -}}
http://{{ include "upstream.mlflowName" . }}.{{ .Release.Namespace }}.svc.cluster.local:{{ .Values.mlflow.port }}
{{- else -}}
{{ required "mlflow.externalUri is required when mlflow.enabled=false" .Values.mlflow.externalUri }}
{{- end -}}
{{- end -}}
