{{/*
Helpers shared by every template. Each takes the root context (`.`) and finds
the chart's values either at `.Values` (this chart rendered on its own) or at
`.Values.outboxd` (this chart is a dependency and a parent chart includes
"outboxd.sidecar"), so the same names come out in both cases.
*/}}

{{/* Base name of every object: "<release>-outboxd", or fullnameOverride. */}}
{{- define "outboxd.fullname" -}}
{{- $v := .Values.outboxd | default .Values -}}
{{- if $v.fullnameOverride -}}
{{- $v.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains "outboxd" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-outboxd" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "outboxd.configMapName" -}}
{{- $v := .Values.outboxd | default .Values -}}
{{- $v.configMap.name | default (include "outboxd.fullname" .) -}}
{{- end -}}

{{- define "outboxd.secretName" -}}
{{- $v := .Values.outboxd | default .Values -}}
{{- $v.secret.name | default (include "outboxd.fullname" .) -}}
{{- end -}}

{{/* The image; tag defaults to this chart's appVersion, also when a parent includes the sidecar. */}}
{{- define "outboxd.image" -}}
{{- $v := .Values.outboxd | default .Values -}}
{{- $chart := .Chart -}}
{{- if and .Values.outboxd .Subcharts (hasKey .Subcharts "outboxd") -}}
{{- $chart = .Subcharts.outboxd.Chart -}}
{{- end -}}
{{- printf "%s:%s" $v.image.repository ($v.image.tag | default $chart.AppVersion) -}}
{{- end -}}

{{- define "outboxd.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: outboxd
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Pod labels of the example Deployment, and the PodMonitor's default selector. */}}
{{- define "outboxd.exampleSelector" -}}
app.kubernetes.io/name: outboxd-example
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
outboxd.toml. Strings go through toJson: a JSON string is a valid TOML basic
string, so quotes and backslashes in values cannot break the file.
*/}}
{{- define "outboxd.config" -}}
{{- $v := .Values.outboxd | default .Values -}}
{{- $c := $v.config -}}
[postgres]
slot = {{ $c.postgres.slot | toJson }}
publication = {{ $c.postgres.publication | toJson }}
table = {{ $c.postgres.table | toJson }}
{{- with $c.postgres.columns }}

[postgres.columns]
{{- range $k, $col := . }}
{{ $k }} = {{ $col | toJson }}
{{- end }}
{{- end }}

[cloudevents]
source = {{ $c.cloudevents.source | default (printf "/%s/%s" .Release.Namespace .Release.Name) | toJson }}
type_prefix = {{ $c.cloudevents.typePrefix | toJson }}

[sink]
kind = {{ $c.sink.kind | toJson }}
{{- if eq $c.sink.kind "nats" }}

[nats]
{{- if not $v.secret.natsUrlKey }}
url = {{ $c.nats.url | toJson }}
{{- end }}
subject = {{ $c.nats.subject | toJson }}
stream = {{ $c.nats.stream | toJson }}
create_stream = {{ $c.nats.createStream }}
{{- end }}
{{- if eq $c.sink.kind "kafka" }}

[kafka]
brokers = {{ $c.kafka.brokers | toJson }}
topic = {{ $c.kafka.topic | toJson }}
{{- with $c.kafka.properties }}

[kafka.properties]
{{- range $k, $p := . }}
{{ $k | toJson }} = {{ $p | toString | toJson }}
{{- end }}
{{- end }}
{{- end }}

[http]
listen = {{ printf "0.0.0.0:%v" $v.httpPort | toJson }}

[log]
format = {{ $c.log.format | toJson }}
level = {{ $c.log.level | toJson }}
{{- end -}}
