{{/* The Secret holding the installation's progress CA (made by the operator when tlsSecretName is empty). */}}
{{- define "alignment-operator.progressTLSSecret" -}}
{{- printf "%s-progress-tls" (include "alignment-operator.fullname" .) | trunc 253 }}
{{- end }}
