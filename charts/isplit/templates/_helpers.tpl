{{/*
Names, labels, images and shared fragments for the isplit chart.
Every component (analyzer, trainer, tail-serving) is named "<fullname>-<component>" and
carries the standard app.kubernetes.io/* labels plus app.kubernetes.io/component.
*/}}

{{/* Chart name, overridable with nameOverride. */}}
{{- define "isplit.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fully qualified app name: "<release>-<chart>", or the release name when it already contains
the chart name. Truncated to leave room for the longest component suffix ("-tail-serving-metrics").
*/}}
{{- define "isplit.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "name-version" for the helm.sh/chart label. */}}
{{- define "isplit.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Name of one component: include "isplit.componentName" (dict "root" $ "component" "analyzer") */}}
{{- define "isplit.componentName" -}}
{{- printf "%s-%s" (include "isplit.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels shared by every object of the release. */}}
{{- define "isplit.selectorLabels" -}}
app.kubernetes.io/name: {{ include "isplit.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Standard labels of the release (no component). */}}
{{- define "isplit.labels" -}}
helm.sh/chart: {{ include "isplit.chart" . }}
{{ include "isplit.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: isplit
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "trainer") */}}
{{- define "isplit.componentSelectorLabels" -}}
{{ include "isplit.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Standard labels of one component: (dict "root" $ "component" "trainer") */}}
{{- define "isplit.componentLabels" -}}
{{ include "isplit.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* metadata.annotations from commonAnnotations merged with extra ones: (dict "root" $ "extra" .Values.x.annotations) */}}
{{- define "isplit.annotations" -}}
{{- $all := merge (dict) (.extra | default dict) (.root.Values.commonAnnotations | default dict) -}}
{{- if $all }}
annotations:
  {{- toYaml $all | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
Image reference: registry/repository:tag[@digest]; global.imageRegistry wins over the
component's registry. A tag that already carries "@sha256:..." (as Skaffold passes it) is kept.
Usage: include "isplit.image" (dict "image" .Values.analyzer.image "root" $)
*/}}
{{- define "isplit.image" -}}
{{- $registry := .image.registry -}}
{{- if and .root.Values.global .root.Values.global.imageRegistry -}}
{{- $registry = .root.Values.global.imageRegistry -}}
{{- end -}}
{{- $tag := .image.tag | default .root.Chart.AppVersion | toString -}}
{{- $ref := .image.repository -}}
{{- if $registry -}}
{{- $ref = printf "%s/%s" $registry .image.repository -}}
{{- end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $ref .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $ref $tag -}}
{{- end -}}
{{- end -}}

{{/* imagePullSecrets of the pod (names only; the Secrets live outside the chart). */}}
{{- define "isplit.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Name of the shared artifact claim (existing, or the one this chart creates). */}}
{{- define "isplit.artifactClaimName" -}}
{{- if .Values.artifacts.persistence.existingClaim -}}
{{- .Values.artifacts.persistence.existingClaim -}}
{{- else -}}
{{- include "isplit.componentName" (dict "root" . "component" "artifacts") -}}
{{- end -}}
{{- end -}}

{{/* The shared artifact volume (pod spec "volumes" item). */}}
{{- define "isplit.artifactVolume" -}}
- name: artifacts
  persistentVolumeClaim:
    claimName: {{ include "isplit.artifactClaimName" . }}
{{- end -}}

{{/* Directory TorchServe uses as its model store (inside the artifact volume). */}}
{{- define "isplit.modelStore" -}}
{{- printf "%s/%s" (.Values.artifacts.mountPath | trimSuffix "/") .Values.artifacts.modelStoreSubPath -}}
{{- end -}}

{{/* Service URLs the trainer uses to reach TorchServe. */}}
{{- define "isplit.torchserveInferenceURL" -}}
{{- printf "http://%s:%v" (include "isplit.componentName" (dict "root" . "component" "tail-serving")) .Values.tailServing.service.ports.inference -}}
{{- end -}}
{{- define "isplit.torchserveManagementURL" -}}
{{- printf "http://%s:%v" (include "isplit.componentName" (dict "root" . "component" "tail-serving")) .Values.tailServing.service.ports.management -}}
{{- end -}}

{{/* The Secret holding the tail-serving keys (inference-key, management-key). */}}
{{- define "isplit.tailServingAuthSecret" -}}
{{- .Values.tailServing.auth.existingSecret | default (printf "%s-auth" (include "isplit.componentName" (dict "root" . "component" "tail-serving"))) -}}
{{- end -}}

{{/* The trainer's TorchServe keys (the gateway's, from that Secret). */}}
{{- define "isplit.tailServingKeysEnv" -}}
- name: ISPLIT_TORCHSERVE_MANAGEMENT_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "isplit.tailServingAuthSecret" . | quote }}
      key: management-key
- name: ISPLIT_TORCHSERVE_INFERENCE_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "isplit.tailServingAuthSecret" . | quote }}
      key: inference-key
{{- end -}}

{{/* ServiceAccount names. */}}
{{- define "isplit.trainer.serviceAccountName" -}}
{{- if .Values.trainer.serviceAccount.create -}}
{{- default (include "isplit.componentName" (dict "root" . "component" "trainer")) .Values.trainer.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.trainer.serviceAccount.name -}}
{{- end -}}
{{- end -}}
{{- define "isplit.analyzer.serviceAccountName" -}}
{{- default (include "isplit.componentName" (dict "root" . "component" "analyzer")) .Values.analyzer.serviceAccount.name -}}
{{- end -}}
{{- define "isplit.analysisJob.serviceAccountName" -}}
{{- include "isplit.componentName" (dict "root" . "component" "analysis-job") -}}
{{- end -}}
{{- define "isplit.trainingJob.serviceAccountName" -}}
{{- include "isplit.componentName" (dict "root" . "component" "training-job") -}}
{{- end -}}

{{/* Environment shared by every Python service container (writable caches under /tmp). */}}
{{/* Kafka authentication of a service (isplit.bus.KafkaSecurity), from kafka.sasl. */}}
{{- define "isplit.kafkaSecurityEnv" -}}
{{- with .Values.kafka.sasl }}
{{- if .enabled }}
- name: ISPLIT_KAFKA_SECURITY_PROTOCOL
  value: {{ .securityProtocol | quote }}
- name: ISPLIT_KAFKA_SASL_MECHANISM
  value: {{ .mechanism | quote }}
- name: ISPLIT_KAFKA_SASL_USERNAME
  {{- if .username }}
  value: {{ .username | quote }}
  {{- else }}
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret | quote }}
      key: {{ .usernameKey | quote }}
  {{- end }}
- name: ISPLIT_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret | quote }}
      key: {{ .passwordKey | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "isplit.pythonRuntimeEnv" -}}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
- name: TORCH_HOME
  value: /tmp/torch
- name: PYTHONUNBUFFERED
  value: "1"
{{- end -}}

{{/* Scrape annotations for the annotation-based Prometheus discovery: (dict "root" $ "port" 8000 "path" "/metrics") */}}
{{- define "isplit.scrapeAnnotations" -}}
{{- if .root.Values.metrics.scrapeAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: {{ .path | quote }}
{{- end }}
{{- end -}}

{{/* The three topics: values key -> name. The names are the services' contract
(isplit.messages.TOPIC_*), prefixed with kafka.topicPrefix exactly as ISPLIT_TOPIC_PREFIX
prefixes them in the services. */}}
{{- define "isplit.topicNames" -}}
splitCandidates: {{ printf "%sisplit.split-candidates.v1" .Values.kafka.topicPrefix }}
trainingResults: {{ printf "%sisplit.training-results.v1" .Values.kafka.topicPrefix }}
deadLetter: {{ printf "%sisplit.dead-letter.v1" .Values.kafka.topicPrefix }}
{{- end -}}

{{/* Fail early on combinations that cannot work; every problem at once. */}}
{{/* The Secret holding the analyzer's token file, and the file's key in it. */}}
{{- define "isplit.analyzer.authSecretName" -}}
{{- default (printf "%s-auth" (include "isplit.componentName" (dict "root" . "component" "analyzer"))) .Values.analyzer.auth.existingSecret -}}
{{- end -}}
{{- define "isplit.analyzer.authSecretKey" -}}
{{- if .Values.analyzer.auth.existingSecret }}{{ .Values.analyzer.auth.existingSecretKey }}{{ else }}tokens.jsonl{{ end -}}
{{- end -}}

{{- define "isplit.validateValues" -}}
{{- $errors := list -}}
{{- if not .Values.kafka.bootstrapServers -}}
{{- $errors = append $errors "kafka.bootstrapServers is required: the address of an existing Kafka, e.g. my-cluster-kafka-bootstrap.kafka:9092 (Strimzi) or kafka.kafka:9092 (Bitnami)" -}}
{{- end -}}
{{- if and .Values.kafka.sasl.enabled (not .Values.kafka.sasl.existingSecret) -}}
{{- $errors = append $errors "kafka.sasl.enabled needs kafka.sasl.existingSecret: the Secret holding the SASL password (e.g. the one Strimzi's User Operator writes for a KafkaUser)" -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled -}}
{{- $errors = append $errors "metrics.serviceMonitor.enabled and metrics.podMonitor.enabled select the same pods: enable one of them" -}}
{{- end -}}
{{- if and (gt (int .Values.analyzer.replicaCount) 1) (not .Values.analyzer.database.existingSecret) -}}
{{- $errors = append $errors "analyzer.replicaCount > 1 needs a shared database: set analyzer.database.existingSecret to a Secret holding a PostgreSQL URL (SQLite on a volume supports one replica)" -}}
{{- end -}}
{{- if and (eq .Values.trainer.executor "kubernetes") (not .Values.trainer.serviceAccount.create) (not .Values.trainer.serviceAccount.name) -}}
{{- $errors = append $errors "trainer.executor=kubernetes needs a ServiceAccount allowed to create Jobs: set trainer.serviceAccount.create=true or name an existing one" -}}
{{- end -}}
{{- if $errors -}}
{{- fail (printf "\n* %s" (join "\n* " $errors)) -}}
{{- end -}}
{{- end -}}

{{/* An IntOrString value: integers unquoted, percentages ("50%") quoted. */}}
{{- define "isplit.intOrPercent" -}}
{{- if kindIs "string" . -}}
{{- . | quote -}}
{{- else -}}
{{- int64 . -}}
{{- end -}}
{{- end -}}

{{/* NetworkPolicy egress rules shared by the components. */}}
{{- define "isplit.np.dnsEgress" -}}
- to:
    - namespaceSelector:
        matchLabels:
          {{- toYaml .Values.networkPolicy.dns.namespaceSelector | nindent 10 }}
      podSelector:
        matchLabels:
          {{- toYaml .Values.networkPolicy.dns.podSelector | nindent 10 }}
  ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- end -}}
{{- define "isplit.np.kafkaEgress" -}}
- ports:
    {{- range .Values.networkPolicy.kafka.ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with .Values.networkPolicy.kafka.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
{{- define "isplit.np.kubeApiEgress" -}}
- ports:
    {{- range .Values.networkPolicy.kubeApiServer.ports }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with .Values.networkPolicy.kubeApiServer.cidrs }}
  to:
    {{- range . }}
    - ipBlock:
        cidr: {{ . | quote }}
    {{- end }}
  {{- end }}
{{- end -}}
