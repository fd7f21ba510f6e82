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
outboxd.toml, rendered from `config` with `extraConfig` merged over it (maps merge
key by key, anything else is replaced, false and "" included), plus what the chart
owns: http.listen from httpPort, cloudevents.source's default, and only the section
of the chosen broker. Keys come out as outboxd spells them; values go through
toJson: a JSON string, number, boolean or array is a valid TOML value, so quotes,
backslashes and newlines in values cannot break the file. Kafka property values
are strings for librdkafka, whatever YAML made of them (5, true).
*/}}
{{- define "outboxd.config" -}}
{{- $v := .Values.outboxd | default .Values -}}
{{- $c := deepCopy $v.config -}}
{{- include "outboxd.deepMerge" (dict "dst" $c "src" (deepCopy ($v.extraConfig | default dict))) -}}
{{- include "outboxd.refuseInConfigMap" $c -}}
{{- $ce := get $c "cloudevents" | default dict -}}
{{- if not $ce.source -}}
{{- $_ := set $ce "source" (printf "/%s/%s" .Release.Namespace .Release.Name) -}}
{{- end -}}
{{- $_ := set $c "cloudevents" $ce -}}
{{- $http := get $c "http" | default dict -}}
{{- $_ := set $http "listen" (printf "0.0.0.0:%v" $v.httpPort) -}}
{{- $_ := set $c "http" $http -}}
{{- $kind := $c.sink.kind -}}
{{- if ne $kind "nats" }}{{ $_ := unset $c "nats" }}{{ end -}}
{{- if ne $kind "kafka" }}{{ $_ := unset $c "kafka" }}{{ end -}}
{{- if and (eq $kind "nats") $v.secret.natsUrlKey (hasKey (get $c "nats" | default dict) "url") -}}
{{- $_ := unset $c.nats "url" -}}
{{- end -}}
{{- $order := list "postgres" "cloudevents" "sink" "nats" "kafka" "retry" "retention" "http" "log" -}}
{{- $first := true -}}
{{- range $section := concat $order (keys $c | sortAlpha) | uniq -}}
{{- if hasKey $c $section -}}
{{- if not $first }}{{ "\n\n" }}{{ end -}}
{{- $first = false -}}
{{- include "outboxd.tomlTable" (dict "path" (list $section) "table" (get $c $section)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Merges map .src into map .dst in place: nested maps key by key, other values replace. */}}
{{- define "outboxd.deepMerge" -}}
{{- $dst := .dst -}}
{{- range $k, $s := .src -}}
{{- $d := get $dst $k -}}
{{- if and (kindIs "map" $s) (kindIs "map" $d) -}}
{{- include "outboxd.deepMerge" (dict "dst" $d "src" $s) -}}
{{- else -}}
{{- $_ := set $dst $k $s -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Refuses what must not reach a ConfigMap, also through extraConfig (values.schema.json
refuses it in `config`): secret values, credentials in nats.url, and the keys the
chart sets itself.
*/}}
{{- define "outboxd.refuseInConfigMap" -}}
{{- $c := . -}}
{{- $secretKeys := dict "postgres" (list "url") "nats" (list "password" "token" "nkey_seed") "http" (list "bearer_token" "basic_auth_password") -}}
{{- range $section, $names := $secretKeys -}}
{{- range $name := $names -}}
{{- if hasKey (get $c $section | default dict) $name -}}
{{- fail (printf "%s.%s is a secret and would land in the ConfigMap: put it in a Secret, mount it with secret.extraSecrets and set %s.%s_file" $section $name $section $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $owned := dict "postgres" (dict "url_file" "secret.postgresUrlKey") "nats" (dict "url_file" "secret.natsUrlKey") "http" (dict "listen" "httpPort") -}}
{{- range $section, $names := $owned -}}
{{- range $name, $instead := $names -}}
{{- if hasKey (get $c $section | default dict) $name -}}
{{- fail (printf "%s.%s is set by the chart: use %s" $section $name $instead) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $nats := get $c "nats" | default dict -}}
{{- if regexMatch "://[^/,]*@" (toString ($nats.url | default "")) -}}
{{- fail "nats.url carries credentials and would land in the ConfigMap: put the URL in the Secret (secret.natsUrlKey), or use nats.password_file, nats.token_file or nats.creds_file" -}}
{{- end -}}
{{- $kafka := get $c "kafka" | default dict -}}
{{- range $name, $_ := get $kafka "properties" | default dict -}}
{{- if regexMatch "password|secret|^ssl\\.key\\.pem$|^sasl\\.oauthbearer\\.config$" $name -}}
{{- fail (printf "kafka.properties.%s is a secret and would land in the ConfigMap: mount it with secret.extraSecrets and name the file in kafka.properties_files" $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A TOML key: bare when it may be, else a quoted string ("security.protocol"). */}}
{{- define "outboxd.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ . | toJson }}{{ end -}}
{{- end -}}

{{/*
One TOML table and its sub-tables: .path is the list of keys leading to it, .table
the map. Plain values first (TOML puts them before any sub-table), then each map
value as [path.key]. A null value or an empty map is left out, so the binary's
default applies.
*/}}
{{- define "outboxd.tomlTable" -}}
{{- $path := .path -}}
{{- $t := .table -}}
{{- $quoted := list -}}
{{- range $path }}{{ $quoted = append $quoted (include "outboxd.tomlKey" .) }}{{ end -}}
[{{ join "." $quoted }}]
{{- $strings := eq (join "." $path) "kafka.properties" -}}
{{- $subtables := list -}}
{{- range $k := keys $t | sortAlpha -}}
{{- $val := get $t $k -}}
{{- if kindIs "map" $val -}}
{{- if $val }}{{ $subtables = append $subtables $k }}{{ end -}}
{{- else if not (kindIs "invalid" $val) }}
{{ include "outboxd.tomlKey" $k }} = {{ if $strings }}{{ $val | toString | toJson }}{{ else }}{{ $val | toJson }}{{ end }}
{{- end -}}
{{- end -}}
{{- range $k := $subtables }}

{{ include "outboxd.tomlTable" (dict "path" (append $path $k) "table" (get $t $k)) }}
{{- end -}}
{{- end -}}
