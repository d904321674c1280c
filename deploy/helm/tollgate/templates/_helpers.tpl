{{/*
Named templates. "tollgate.sidecar" and "tollgate.volumes" are also for
charts that add the sidecar to a Deployment of their own: with this chart
as a dependency, pass its values in the context, e.g.

  initContainers:
    {{- include "tollgate.sidecar" (dict "Values" .Values.tollgate "Release" .Release "Chart" .Chart) | nindent 8 }}
  volumes:
    {{- include "tollgate.volumes" (dict "Values" .Values.tollgate "Release" .Release "Chart" .Chart) | nindent 8 }}
*/}}

{{/* The app's name: app.name, else the release name. */}}
{{- define "tollgate.appName" -}}
{{- default .Release.Name .Values.app.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The ConfigMap holding tollgate.toml. */}}
{{- define "tollgate.configMapName" -}}
{{- if .Values.existingConfigMap -}}
{{- .Values.existingConfigMap -}}
{{- else -}}
{{- printf "%s-tollgate-config" (.Release.Name | trunc 46 | trimSuffix "-") -}}
{{- end -}}
{{- end -}}

{{/* The config text: `config`, else the chart's example. */}}
{{- define "tollgate.config" -}}
{{- default (.Files.Get "files/tollgate.toml") .Values.config -}}
{{- end -}}

{{- define "tollgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
{{- end -}}

{{/* The native sidecar: an init container that keeps running. */}}
{{- define "tollgate.sidecar" -}}
- name: tollgate
  image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
  imagePullPolicy: {{ .Values.image.pullPolicy | quote }}
  # Starts, and is ready, before the app; stops after it.
  restartPolicy: Always
  args: ["run", "--config", "/etc/tollgate/tollgate.toml", "--log-format", "json"]
  ports:
    - name: tg-proxy
      containerPort: {{ .Values.ports.proxy }}
    - name: tg-admin
      containerPort: {{ .Values.ports.admin }}
  env:
    - name: RUST_LOG
      value: {{ .Values.logLevel | quote }}
    {{- range .Values.secretEnv.keys }}
    - name: {{ . | quote }}
      valueFrom:
        secretKeyRef:
          name: {{ $.Values.secretEnv.secretName | quote }}
          key: {{ . | quote }}
    {{- end }}
    {{- with .Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  startupProbe:
    httpGet:
      path: /healthz
      port: tg-admin
    periodSeconds: 1
    failureThreshold: 30
  readinessProbe:
    httpGet:
      path: /readyz
      port: tg-admin
    periodSeconds: 5
  livenessProbe:
    httpGet:
      path: /healthz
      port: tg-admin
    periodSeconds: 10
    failureThreshold: 3
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  # Complete on its own (a parent chart's pod may set none of it): the
  # image's nonroot user, which owns the data volume through fsGroup.
  securityContext:
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    runAsNonRoot: true
    runAsUser: 65532
    runAsGroup: 65532
    capabilities:
      drop: ["ALL"]
    seccompProfile:
      type: RuntimeDefault
  volumeMounts:
    # A directory, not a subPath: an edited ConfigMap reaches the file.
    - name: tollgate-config
      mountPath: /etc/tollgate
      readOnly: true
    # data_dir: the spool, cursors and the budget snapshot.
    - name: tollgate-data
      mountPath: /var/lib/tollgate
{{- end -}}

{{- define "tollgate.volumes" -}}
- name: tollgate-config
  configMap:
    name: {{ include "tollgate.configMapName" . | quote }}
- name: tollgate-data
  {{- if .Values.data.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.data.existingClaim | quote }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ .Values.data.sizeLimit | quote }}
  {{- end }}
{{- end -}}
