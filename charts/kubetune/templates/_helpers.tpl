{{- define "kubetune.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.labels" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end -}}

{{- define "kubetune.selector" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end -}}

{{- define "kubetune.serviceAccountName" -}}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "kubetune.peeringName" -}}
{{- include "kubetune.fullname" . -}}
{{- end -}}

{{- /* The Secret the operator keeps its progress CA and certificate in (release namespace). */}}
{{- define "kubetune.progressCertSecret" -}}
{{- printf "%s-progress-tls" (include "kubetune.fullname" .) -}}
{{- end -}}

{{- /* The operator makes and renews its own progress certificate: HTTPS, no Secret of yours. */}}
{{- define "kubetune.ownProgressCert" -}}
{{- if and .Values.progress.enabled (not .Values.progress.plainHTTP) (not .Values.progress.tlsSecretName) }}true{{ end -}}
{{- end -}}
