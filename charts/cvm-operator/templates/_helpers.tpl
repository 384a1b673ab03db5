{{- define "cvm-operator.labels" -}}
app.kubernetes.io/name: cvm-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* An image reference: pass (list $ .Values.operator.image). */}}
{{- define "cvm-operator.imageRef" -}}
{{- $root := index . 0 -}}
{{- $img := index . 1 -}}
{{- with $root.Values.image.registry }}{{ . }}/{{ end }}{{ $img.repository }}:{{ $root.Values.image.tag | default $root.Chart.AppVersion }}
{{- end }}

{{- define "cvm-operator.pluginSA" -}}
{{ .Release.Name }}-node-plugin
{{- end }}
