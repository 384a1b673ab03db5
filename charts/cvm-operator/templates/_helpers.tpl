{{- define "cvm-operator.labels" -}}
app.kubernetes.io/name: cvm-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "cvm-operator.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "cvm-operator.pluginSA" -}}
{{ .Release.Name }}-node-plugin
{{- end }}
