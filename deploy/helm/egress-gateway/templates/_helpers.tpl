{{/*
Labels Helm adds to every object besides the kustomize base's own (the manifest test
strips exactly these two before comparing the two renderings).
*/}}
{{- define "egress-gateway.chartLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
gateway.yaml: the `config` value, plus what the chart decides (the Workload API socket
in the CSI mount, the policy's mount, interception).
*/}}
{{- define "egress-gateway.gatewayYaml" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $identity := get $cfg "identity" | default dict -}}
{{- $_ := set $identity "workload_api" (printf "unix:///spiffe-workload-api/%s" .Values.spire.socketFile) -}}
{{- $_ := set $cfg "identity" $identity -}}
{{- $_ := set $cfg "policy" "/etc/egress-gateway/policy/policy.yaml" -}}
{{- if .Values.interception.enabled -}}
{{- $_ := set $cfg "interception" (dict "ca_cert" "/etc/egress-gateway/interception/ca.crt" "ca_key" "/etc/egress-gateway/interception/ca.key" "leaf_ttl" .Values.interception.leafTtl) -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end }}

{{/* The generated ConfigMap's name: a changed gateway.yaml rolls the pods. */}}
{{- define "egress-gateway.configName" -}}
egress-gateway-config-{{ include "egress-gateway.gatewayYaml" . | sha256sum | trunc 10 }}
{{- end }}

{{/* The pods of the gateway, as selectors name them. */}}
{{- define "egress-gateway.gatewayPods" -}}
app.kubernetes.io/name: egress-gateway
{{- end }}

{{/* kube-dns, as a NetworkPolicy peer. */}}
{{- define "egress-gateway.kubeDns" -}}
- namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: kube-system
  podSelector:
    matchLabels:
      k8s-app: kube-dns
{{- end }}

{{- define "egress-gateway.dnsPorts" -}}
- protocol: UDP
  port: 53
- protocol: TCP
  port: 53
{{- end }}
