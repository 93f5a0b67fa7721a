{{/*
Names, labels, image references and the operator's RBAC rules, shared by the templates.
*/}}

{{- define "smart-diffusion.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-<chart>, or just <release> when it already contains the chart name. */}}
{{- define "smart-diffusion.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "smart-diffusion.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "smart-diffusion.operatorName" -}}
{{- printf "%s-operator" (include "smart-diffusion.fullname" .) -}}
{{- end -}}

{{- define "smart-diffusion.serviceAccountName" -}}
{{- default (include "smart-diffusion.operatorName" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "smart-diffusion.selectorLabels" -}}
app.kubernetes.io/name: {{ include "smart-diffusion.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "smart-diffusion.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "smart-diffusion.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: smart-diffusion
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* repository:tag or repository@digest; call with (dict "image" .Values.x.image "root" $). */}}
{{- define "smart-diffusion.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
The model catalog as the operator reads it (SMARTDIFF_MODELS): a JSON list of
{"name", "numHeads", "weights"}. A name given twice fails the install.
*/}}
{{- define "smart-diffusion.modelsJson" -}}
{{- $models := list -}}
{{- $seen := dict -}}
{{- range .Values.models -}}
{{- if hasKey $seen .name -}}
{{- fail (printf "models: the name %q is given twice; each model name may appear once" .name) -}}
{{- end -}}
{{- $_ := set $seen .name true -}}
{{- $entry := dict "name" .name "numHeads" (int .numHeads) -}}
{{- if .weights -}}
{{- $_ := set $entry "weights" .weights -}}
{{- end -}}
{{- if .defaultGpus -}}
{{- $_ := set $entry "defaultGpus" (int .defaultGpus) -}}
{{- end -}}
{{- if .spatialCompression -}}
{{- $_ := set $entry "spatialCompression" (int .spatialCompression) -}}
{{- end -}}
{{- $models = append $models $entry -}}
{{- end -}}
{{- toJson $models -}}
{{- end -}}

{{/* "KEY=VALUE,KEY2=VALUE2" from a map, sorted by key (the operator's format). */}}
{{- define "smart-diffusion.pairs" -}}
{{- $pairs := list -}}
{{- range $key, $value := . -}}
{{- $pairs = append $pairs (printf "%s=%s" $key $value) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{/*
What the operator's ServiceAccount may do: exactly smartdiff_operator.rbac.OPERATOR_RULES
(tests/test_helm_chart.py compares them). It watches VideoGenerations and the Jobs and Pods
it owns, creates each generation's Job (and headless Service) and the runtime pods'
ServiceAccount, Role and RoleBinding, writes status and posts Events. It never reads
Secrets. It holds get on videogenerations and patch on videogenerations/status itself,
which is what lets it grant those two (for one generation) to the runtime pods.
*/}}
{{- define "smart-diffusion.operatorRules" -}}
- apiGroups: ["smartdiff.io"]
  resources: ["videogenerations"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["smartdiff.io"]
  resources: ["videogenerations/status"]
  verbs: ["patch"]
- apiGroups: ["smartdiff.io"]
  resources: ["videogenerations/finalizers"]
  verbs: ["update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["services", "serviceaccounts"]
  verbs: ["get", "create"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "create"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}
