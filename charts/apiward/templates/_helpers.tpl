{{/* The release's base name: "apiward" for a release named apiward (the names the docs use). */}}
{{- define "apiward.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "apiward.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "apiward.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "apiward.serviceAccountName" -}}
{{- default (include "apiward.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "apiward.webhookService" -}}{{ include "apiward.fullname" . }}-webhook{{- end -}}
{{- define "apiward.metricsService" -}}{{ include "apiward.fullname" . }}-metrics{{- end -}}
{{- define "apiward.webhookConfiguration" -}}{{ include "apiward.fullname" . }}-sidecar-injector{{- end -}}
{{- define "apiward.validatingConfiguration" -}}{{ include "apiward.fullname" . }}-policy-validator{{- end -}}
{{- /* The 9443 server runs when either admission webhook is registered. */ -}}
{{- define "apiward.webhookServed" -}}{{ if or .Values.webhook.enabled .Values.validation.enabled }}true{{ end }}{{- end -}}
{{- define "apiward.webhookSecret" -}}{{ include "apiward.fullname" . }}-webhook-tls{{- end -}}

{{- define "apiward.image" -}}
{{- printf "%s:%s" .repository (default .appVersion .tag) -}}
{{- end -}}

{{/* The namespaces the webhook never sends: kube-system, the release's own, and any listed. */}}
{{- define "apiward.excludedNamespaces" -}}
{{- $ns := list "kube-system" .Release.Namespace -}}
{{- range .Values.webhook.excludeNamespaces }}{{ $ns = append $ns . }}{{ end -}}
{{- toJson (uniq $ns) -}}
{{- end -}}

{{/* What the webhook puts in each pod (the operator's SidecarTemplate, as JSON). */}}
{{- define "apiward.sidecarTemplate" -}}
{{- $s := .Values.sidecar -}}
{{- $t := dict
      "image" (include "apiward.image" (merge (dict "appVersion" .Chart.AppVersion) $s.image))
      "initImage" (include "apiward.image" (merge (dict "appVersion" .Chart.AppVersion) $s.initImage))
      "imagePullPolicy" $s.image.pullPolicy
      "resources" $s.resources
      "logLevel" $s.logLevel
      "controlUrl" (printf "https://%s.%s.svc:15012" (include "apiward.fullname" .) .Release.Namespace)
      "trustDomain" .Values.trustDomain -}}
{{- with .Values.globalQuotas.redis.url -}}
{{- $_ := set $t "quotaStore" (dict "url" . "timeout" $.Values.globalQuotas.redis.timeout) -}}
{{- end -}}
{{- toJson $t -}}
{{- end -}}
