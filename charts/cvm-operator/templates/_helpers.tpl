{{- define "cvm-operator.labels" -}}
app.kubernetes.io/name: cvm-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
