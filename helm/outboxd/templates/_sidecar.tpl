{{/*
The outboxd native sidecar and the volumes it needs.

Use it from your own chart, with this chart as a dependency named "outboxd":

  spec:
    template:
      spec:
        initContainers:
          {{- include "outboxd.sidecar" . | nindent 10 }}
        containers:
          - name: app
            ...
        volumes:
          {{- include "outboxd.volumes" . | nindent 10 }}

Being an init container with restartPolicy: Always makes it a native sidecar
(Kubernetes >= 1.29): it starts before the app containers (once its startup
probe passes), keeps running beside them, and is stopped after them, so
events written by the app during shutdown are still relayed.
*/}}
{{- define "outboxd.sidecar" -}}
{{- $v := .Values.outboxd | default .Values -}}
- name: outboxd
  image: {{ include "outboxd.image" . | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  restartPolicy: Always
  args: ["run", "--config", "/etc/outboxd/outboxd.toml"]
  env:
    - name: OUTBOXD_POSTGRES__URL_FILE
      value: /var/run/secrets/outboxd/{{ $v.secret.postgresUrlKey }}
    {{- if $v.secret.natsUrlKey }}
    - name: OUTBOXD_NATS__URL_FILE
      value: /var/run/secrets/outboxd/{{ $v.secret.natsUrlKey }}
    {{- end }}
    {{- with $v.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: outboxd-metrics
      containerPort: {{ $v.httpPort }}
      protocol: TCP
  startupProbe:
    httpGet: {path: /healthz, port: outboxd-metrics}
    periodSeconds: {{ $v.probes.startup.periodSeconds }}
    failureThreshold: {{ $v.probes.startup.failureThreshold }}
  livenessProbe:
    httpGet: {path: /healthz, port: outboxd-metrics}
    periodSeconds: {{ $v.probes.liveness.periodSeconds }}
    failureThreshold: {{ $v.probes.liveness.failureThreshold }}
  readinessProbe:
    httpGet: {path: /readyz, port: outboxd-metrics}
    periodSeconds: {{ $v.probes.readiness.periodSeconds }}
    failureThreshold: {{ $v.probes.readiness.failureThreshold }}
  resources:
    {{- toYaml $v.resources | nindent 4 }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  volumeMounts:
    - name: outboxd-config
      mountPath: /etc/outboxd
      readOnly: true
    - name: outboxd-secret
      mountPath: /var/run/secrets/outboxd
      readOnly: true
{{- end -}}

{{- define "outboxd.volumes" -}}
- name: outboxd-config
  configMap:
    name: {{ include "outboxd.configMapName" . }}
- name: outboxd-secret
  secret:
    secretName: {{ include "outboxd.secretName" . }}
    defaultMode: 0444
{{- end -}}
