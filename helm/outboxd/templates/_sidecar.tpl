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
  {{- with $v.extraEnvFrom }}
  envFrom:
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
    {{- with $v.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{- define "outboxd.volumes" -}}
{{- $v := .Values.outboxd | default .Values -}}
- name: outboxd-config
  configMap:
    name: {{ include "outboxd.configMapName" . }}
{{- /*
One directory, /var/run/secrets/outboxd, for every secret file: the Secret with the
URLs and each of secret.extraSecrets (certificates, a .creds file, passwords).
*/}}
- name: outboxd-secret
  projected:
    defaultMode: 0444
    sources:
      - secret:
          name: {{ include "outboxd.secretName" . }}
      {{- range $v.secret.extraSecrets }}
      - secret:
          name: {{ .name }}
          {{- with .items }}
          items:
            {{- toYaml . | nindent 12 }}
          {{- end }}
      {{- end }}
{{- with $v.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}
