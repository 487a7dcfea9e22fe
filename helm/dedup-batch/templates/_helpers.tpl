{{/*
Names, labels and the pod pieces shared by the job, the Dask scheduler and the Dask workers.
*/}}

{{/* The chart name (63 chars max: a DNS label). */}}
{{- define "dedup-batch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name prefix of every object. 52 chars max so that "<fullname>-scheduler" and the
Job's pod names (Job name + "-xxxxx") stay within the 63-char DNS-label limit.
*/}}
{{- define "dedup-batch.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dedup-batch.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that never change for a release: safe in selectors. */}}
{{- define "dedup-batch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dedup-batch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The standard app.kubernetes.io/* labels of every object. */}}
{{- define "dedup-batch.labels" -}}
helm.sh/chart: {{ include "dedup-batch.chart" . }}
{{ include "dedup-batch.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dedup-batch
{{- end }}

{{- define "dedup-batch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dedup-batch.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest pins the image. */}}
{{- define "dedup-batch.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The in-cluster address of the chart's scheduler (dask.mode chart). */}}
{{- define "dedup-batch.schedulerHost" -}}
{{- printf "%s-scheduler.%s.svc" (include "dedup-batch.fullname" .) .Release.Namespace }}
{{- end }}

{{/* The scheduler the job connects to; empty in dask.mode local (LocalCluster in the pod). */}}
{{- define "dedup-batch.schedulerAddress" -}}
{{- if eq .Values.dask.mode "external" }}
{{- required "dask.external.address is required when dask.mode is external (e.g. tcp://dask-scheduler.dask.svc:8786)" .Values.dask.external.address }}
{{- else if eq .Values.dask.mode "chart" }}
{{- printf "tcp://%s:%d" (include "dedup-batch.schedulerHost" .) (int .Values.dask.scheduler.port) }}
{{- end }}
{{- end }}

{{/*
Pod securityContext: numeric non-root user of the image (10001), RuntimeDefault seccomp.
fsGroup makes the emptyDirs writable for that group whatever the node's defaults.
*/}}
{{- define "dedup-batch.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container securityContext: read-only root, no privilege escalation, no capabilities. */}}
{{- define "dedup-batch.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Writable places on a read-only root filesystem: /scratch (HOME, working directory, Dask's
local directory for spilled data) and /tmp.
*/}}
{{- define "dedup-batch.scratchVolumes" -}}
- name: scratch
  emptyDir:
    sizeLimit: {{ .Values.scratch.sizeLimit | quote }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.scratch.tmpSizeLimit | quote }}
{{- end }}

{{- define "dedup-batch.scratchMounts" -}}
- name: scratch
  mountPath: /scratch
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* Environment of every container: where to write, and Dask's local directory. */}}
{{- define "dedup-batch.baseEnv" -}}
- name: HOME
  value: /scratch
- name: TMPDIR
  value: /tmp
- name: DASK_TEMPORARY_DIRECTORY
  value: /scratch/dask
- name: MPLCONFIGDIR
  value: /scratch/.config/matplotlib
{{- end }}

{{/*
S3 settings of the containers that touch storage (the job and the workers). Credentials only
ever come from the named Secret (secretKeyRef here, or envFrom below) or the ServiceAccount.
*/}}
{{- define "dedup-batch.storageEnv" -}}
{{- with .Values.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.retryMode }}
- name: AWS_RETRY_MODE
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.requestChecksumCalculation }}
- name: AWS_REQUEST_CHECKSUM_CALCULATION
  value: {{ . | quote }}
{{- end }}
{{- if and .Values.s3.existingSecret .Values.s3.secretEnv }}
{{- range $envName, $key := .Values.s3.secretEnv }}
- name: {{ $envName }}
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.s3.existingSecret | quote }}
      key: {{ $key | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* The user's extra environment variables (last, so they can override Dask settings). */}}
{{- define "dedup-batch.extraEnv" -}}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* envFrom: the whole Secret, when no key mapping is given. */}}
{{- define "dedup-batch.s3EnvFrom" -}}
{{- if and .Values.s3.existingSecret (not .Values.s3.secretEnv) }}
envFrom:
  - secretRef:
      name: {{ .Values.s3.existingSecret | quote }}
{{- end }}
{{- end }}

{{/* Scheduling and identity shared by every pod of the release. */}}
{{- define "dedup-batch.podCommon" -}}
serviceAccountName: {{ include "dedup-batch.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
{{- /* No Service environment variables: nothing in the job reads them. */}}
enableServiceLinks: false
securityContext:
  {{- include "dedup-batch.podSecurityContext" . | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The job spec as the CLI reads it: the user's jobSpec, with mode "plan" (a dry run) and JSON
log lines unless the user set them. `scheduler` is left out: dask.mode decides it.
*/}}
{{- define "dedup-batch.jobSpec" -}}
{{- $spec := omit (deepCopy .Values.jobSpec) "scheduler" }}
{{- $_ := required "jobSpec.features is required: the feature shards to read (e.g. [s3://bucket/features/*.parquet])" $spec.features }}
{{- $_ := required "jobSpec.root is required: the image collection the feature paths resolve against (e.g. s3://bucket/images/)" $spec.root }}
{{- toYaml (merge $spec (dict "mode" "plan" "log_format" "json")) }}
{{- end }}
