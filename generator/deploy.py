"""Kubernetes manifests for a tritonforge deployment (`generator deploy k8s`).

A kustomize base: ConfigMap (what the entrypoint builds), Deployment, Service,
PersistentVolumeClaim (HF cache), HorizontalPodAutoscaler and ServiceMonitor. Templates are
rendered with Jinja2 StrictUndefined; docker/k8s/base is this module's output for the
example model, and a test keeps the two equal.

Two ways a pod gets its model repository:
- "build": MODEL/TASK/GENERATOR_BUILD_ARGS in the ConfigMap; the image's entrypoint runs
  `generator build` at start (weights land in the HF cache on the PVC);
- "baked": the repository (built with --download) is copied into the image at /models
  (`FROM tritonforge` + `COPY model_repository /models`); MODEL stays empty.

A repository's engine.json with `tensor_parallel_size` N (in its `engine` settings) asks for N
GPUs per pod (`nvidia.com/gpu: N`): the engine's ranks take cuda:0..N-1 of the pod's GPUs.
Every pod runs with NVLink multicast off (tritonserver.NVLINK_MULTICAST_OFF in its env).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from tritonforge.generator.errors import UserError
from tritonforge.generator.render import sanitize_model_name
from tritonforge.generator.tritonserver import NVLINK_MULTICAST_OFF

from tritonforge import __version__

# The image's ports and paths (docker/Dockerfile, docker/entrypoint.sh say the same).
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
HF_HOME = "/var/cache/huggingface"
MODEL_REPOSITORY = "/models"
RUN_AS = 10001
# Shutdown budget: preStop sleep (endpoints drop the pod) + tritonserver --exit-timeout-secs
# (in-flight requests finish) fit inside terminationGracePeriodSeconds with a margin.
PRESTOP_SLEEP_S = 10
EXIT_TIMEOUT_S = 30
GRACE_PERIOD_S = 60
# The startupProbe allows FAILURE_THRESHOLD * PERIOD seconds for download + weight loading.
STARTUP_PERIOD_S = 10
# The image's readiness check (docker/ready.py, copied there by docker/Dockerfile).
READY_COMMAND = ["python3", "/opt/tritonforge/docker/ready.py"]
STARTUP_FAILURE_THRESHOLD = 180
# HPA metrics, as the Prometheus adapter exposes them (see docker/k8s/README section).
HPA_METRICS = {
    "generate": (("vllm_num_requests_waiting", "4"), ("vllm_kv_cache_usage_perc", "800m")),
    "embed": (("nv_inference_pending_request_count", "32"),),
    "classify": (("nv_inference_pending_request_count", "32"),),
}
FILES = ("configmap.yaml", "pvc.yaml", "deployment.yaml", "service.yaml", "hpa.yaml",
         "servicemonitor.yaml")
_DNS_LABEL_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LONGEST_SUFFIX = "-hf-cache"


def validate_name(name: str) -> str:
    """A DNS-1123 label that also starts with a letter (Service names need it), short
    enough for the longest derived name (`<name>-hf-cache`)."""
    limit = 63 - len(_LONGEST_SUFFIX)
    if not _DNS_LABEL_RE.match(name) or len(name) > limit:
        raise UserError(f"invalid --name {name!r}: use 1-{limit} lowercase letters, digits or "
                        "'-', starting with a letter and ending with a letter or digit")
    return name


@dataclass
class DeploySpec:
    name: str
    model_name: str  # the Triton model the pods serve
    task: str | None  # None: the entrypoint detects it
    model: str = ""  # empty: the repository is baked into the image
    build_args: list[str] = field(default_factory=list)
    image: str = "tritonforge:latest"
    gpus: int = 1
    replicas: int = 1
    hpa_max: int = 4
    # The build ran with --trust-remote-code: the pods get the server-side consent too
    # (backend/engine_settings.py refuses remote code without it).
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        validate_name(self.name)
        if not self.image or any(c.isspace() for c in self.image):
            raise ValueError(f"image must be a non-empty image reference, got {self.image!r}")
        if self.gpus < 0:
            raise ValueError(f"gpus must be >= 0, got {self.gpus}")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.hpa_max < self.replicas:
            raise ValueError(f"hpa_max must be >= replicas ({self.replicas}), got {self.hpa_max}")


def spec_for_model(model: str, task: str | None, **kw) -> DeploySpec:
    """Pods build MODEL at start."""
    model_name = sanitize_model_name(model)
    kind = "gpu" if kw.get("gpus", 1) > 0 else "cpu"
    return DeploySpec(model_name=model_name, task=task, model=model,
                      build_args=["--name", model_name, "--kind", kind], **kw)


def spec_for_repository(repo: Path, **kw) -> DeploySpec:
    """Pods serve what `generator build` put in REPO: rebuilt from its hub id, or baked."""
    repo = Path(repo)
    models = sorted(p for p in repo.glob("*/engine.json")) if repo.is_dir() else []
    if not models:
        raise UserError(f"{repo} holds no model built by `generator build` (no */engine.json)")
    if len(models) > 1:
        names = ", ".join(p.parent.name for p in models)
        raise UserError(f"{repo} holds {len(models)} models ({names}); deploy one per repository")
    folder = models[0].parent
    try:
        s = json.loads(models[0].read_text(encoding="utf-8"))
        task, source, hub = s["task"], s["source"], s["hub"]
        tensor_parallel_size = int(s.get("engine", {}).get("tensor_parallel_size", 1))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{models[0]} is not a generator engine.json ({err})") from None
    kw["gpus"] = _gpus_for(folder.name, tensor_parallel_size, kw.get("gpus"))
    if s.get("downloaded") or hub == "local":
        if not s.get("downloaded"):
            raise UserError(f"{folder.name} was built from the local folder {source} without "
                            "--download: rebuild with --download so the weights travel with the "
                            "repository, or build from a hub id")
        return DeploySpec(model_name=folder.name, task=task,
                          trust_remote_code=bool(s.get("trust_remote_code")), **kw)
    kind = "gpu" if kw.get("gpus", 1) > 0 else "cpu"
    args = ["--name", folder.name, "--kind", kind, "--hub", hub]
    flags = {"revision": "--revision", "dtype": "--dtype", "max_model_len": "--max-model-len",
             "gpu_memory_utilization": "--gpu-memory-utilization",
             "max_num_seqs": "--max-num-seqs", "instance_count": "--instance-count",
             "tokenizer_instance_count": "--tokenizer-instances", "model_impl": "--model-impl"}
    for key, flag in flags.items():
        if s.get(key) not in (None, "", "auto"):
            args += [flag, str(s[key])]
    if tensor_parallel_size > 1:
        args += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if s.get("trust_remote_code"):
        args.append("--trust-remote-code")
    return DeploySpec(model_name=folder.name, task=task, model=source, build_args=args,
                      trust_remote_code=bool(s.get("trust_remote_code")), **kw)


def _gpus_for(model: str, tensor_parallel_size: int, gpus: int | None) -> int:
    """GPUs per pod for a model built with `tensor_parallel_size`: that many unless asked
    otherwise; 0 (a CPU pod) stays allowed, any other count is refused."""
    if gpus is None:
        return tensor_parallel_size
    if gpus not in (0, tensor_parallel_size) and tensor_parallel_size > 1:
        raise UserError(f"--gpus {gpus}: {model} was built with --tensor-parallel-size "
                        f"{tensor_parallel_size}, so each pod's engine needs exactly "
                        f"{tensor_parallel_size} GPUs; pass --gpus {tensor_parallel_size} "
                        "or leave --gpus out")
    return gpus


def render(spec: DeploySpec) -> dict[str, str]:
    """File name -> YAML text, kustomization.yaml included."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.filters["q"] = json.dumps  # a YAML-safe double-quoted scalar
    context = {
        "s": spec, "ports": PORTS, "hf_home": HF_HOME, "repo": MODEL_REPOSITORY,
        "run_as": RUN_AS, "prestop": PRESTOP_SLEEP_S, "exit_timeout": EXIT_TIMEOUT_S,
        "grace": GRACE_PERIOD_S, "startup_period": STARTUP_PERIOD_S,
        "startup_failures": STARTUP_FAILURE_THRESHOLD, "version": __version__,
        "metrics": HPA_METRICS[spec.task or "generate"],
        "build_args": " ".join(spec.build_args), "ready_command": json.dumps(READY_COMMAND),
        "nvlink_multicast_off": NVLINK_MULTICAST_OFF,
    }
    out = {f: env.from_string(TEMPLATES[f]).render(context) for f in FILES}
    out["kustomization.yaml"] = env.from_string(KUSTOMIZATION).render(context)
    return out


def write(spec: DeploySpec, output: Path) -> list[Path]:
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output} exists and is not a folder")
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, text in render(spec).items():
        (output / fname).write_text(text, encoding="utf-8")
        written.append(output / fname)
    return written


_META = """metadata:
  name: {{ s.name }}{{ suffix }}
  labels:
    app.kubernetes.io/name: tritonforge
    app.kubernetes.io/instance: {{ s.name }}
    app.kubernetes.io/version: {{ version | q }}
"""
_SELECTOR = """app.kubernetes.io/name: tritonforge
      app.kubernetes.io/instance: {{ s.name }}"""

TEMPLATES = {
    "configmap.yaml": """apiVersion: v1
kind: ConfigMap
""" + _META.replace("{{ suffix }}", "-config") + """data:
  # Read by docker/entrypoint.sh: MODEL set -> `generator build` at start; empty -> serve
  # the repository baked into the image at {{ repo }}.
  MODEL: {{ s.model | q }}
  TASK: {{ (s.task or "") | q }}
  GENERATOR_BUILD_ARGS: {{ build_args | q }}
  TRITON_MODEL_NAME: {{ s.model_name | q }}
  TRITONSERVER_ARGS: ""
{% if s.trust_remote_code %}
  # The build asked for the model's own code; the server runs it only with this consent.
  TRITONFORGE_TRUST_REMOTE_CODE: "1"
{% endif %}
""",
    "pvc.yaml": """apiVersion: v1
kind: PersistentVolumeClaim
""" + _META.replace("{{ suffix }}", "-hf-cache") + """spec:
  # Shared by every replica the HPA starts: ReadWriteMany (set storageClassName to an RWX
  # class, or patch to ReadWriteOnce for a single-node deployment).
  accessModes: ["ReadWriteMany"]
  resources:
    requests:
      storage: 100Gi
""",
    "deployment.yaml": """apiVersion: apps/v1
kind: Deployment
""" + _META.replace("{{ suffix }}", "") + """spec:
  replicas: {{ s.replicas }}
  selector:
    matchLabels:
      """ + _SELECTOR + """
  template:
    metadata:
      labels:
        """ + _SELECTOR.replace("      ", "        ") + """
    spec:
      # preStop sleep ({{ prestop }}s) + tritonserver --exit-timeout-secs
      # ({{ exit_timeout }}s) < {{ grace }}s
      terminationGracePeriodSeconds: {{ grace }}
      securityContext:
        runAsNonRoot: true
        runAsUser: {{ run_as }}
        runAsGroup: {{ run_as }}
        fsGroup: {{ run_as }}
      containers:
        - name: tritonserver
          image: {{ s.image | q }}
          imagePullPolicy: IfNotPresent
          envFrom:
            - configMapRef:
                name: {{ s.name }}-config
          env:
            - name: HF_HOME
              value: {{ hf_home | q }}
            - name: MODEL_REPOSITORY
              value: {{ repo | q }}
            - name: TRITON_EXIT_TIMEOUT_SECS
              value: "{{ exit_timeout }}"
            # NVLink multicast off in NCCL, torch and NVSHMEM: it can take the node's GPUs
            # out of service (generator/tritonserver.py, NVLINK_MULTICAST_OFF).
{% for name, value in nvlink_multicast_off.items() %}
            - name: {{ name }}
              value: {{ value | q }}
{% endfor %}
          ports:
{% for name, port in ports.items() %}
            - name: {{ name }}
              containerPort: {{ port }}
              protocol: TCP
{% endfor %}
          resources:
            requests:
              cpu: "2"
              memory: 16Gi
{% if s.gpus %}
              nvidia.com/gpu: {{ s.gpus }}
{% endif %}
            limits:
              memory: 32Gi
{% if s.gpus %}
              nvidia.com/gpu: {{ s.gpus }}
{% endif %}
          # Up to {{ startup_period * startup_failures }}s for download + weight loading.
          # ready.py asks Triton whether TRITON_MODEL_NAME is ready (the server's own
          # readiness stays true after a model whose engine died unloads itself).
          startupProbe:
            exec:
              command: {{ ready_command }}
            periodSeconds: {{ startup_period }}
            timeoutSeconds: 5
            failureThreshold: {{ startup_failures }}
          readinessProbe:
            exec:
              command: {{ ready_command }}
            periodSeconds: 5
            timeoutSeconds: 5
            failureThreshold: 3
          livenessProbe:
            httpGet:
              path: /v2/health/live
              port: http
            periodSeconds: 10
            timeoutSeconds: 5
            failureThreshold: 6
          lifecycle:
            preStop:
              # Let the Service drop this pod before tritonserver stops taking requests.
              exec:
                command: ["sleep", "{{ prestop }}"]
          volumeMounts:
            - name: hf-cache
              mountPath: {{ hf_home }}
            - name: dshm
              mountPath: /dev/shm
{% if s.model %}
            - name: model-repository
              mountPath: {{ repo }}
{% endif %}
      volumes:
        - name: hf-cache
          persistentVolumeClaim:
            claimName: {{ s.name }}-hf-cache
        # The Python backend moves tensors through shared memory; the default 64Mi is too small.
        - name: dshm
          emptyDir:
            medium: Memory
            sizeLimit: 2Gi
{% if s.model %}
        - name: model-repository
          emptyDir: {}
{% endif %}
""",
    "service.yaml": """apiVersion: v1
kind: Service
""" + _META.replace("{{ suffix }}", "") + """spec:
  type: ClusterIP
  selector:
    """ + _SELECTOR.replace("      ", "    ") + """
  ports:
{% for name, port in ports.items() %}
    - name: {{ name }}
      port: {{ port }}
      targetPort: {{ name }}
      protocol: TCP
{% endfor %}
""",
    "hpa.yaml": """apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
""" + _META.replace("{{ suffix }}", "") + """spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ s.name }}
  minReplicas: {{ s.replicas }}
  maxReplicas: {{ s.hpa_max }}
  # Per-pod averages of the backend's gauges, served to the HPA by the Prometheus adapter
  # (rules in README.md, "Deploy on Kubernetes").
  metrics:
{% for metric, target in metrics %}
    - type: Pods
      pods:
        metric:
          name: {{ metric }}
        target:
          type: AverageValue
          averageValue: {{ target | q }}
{% endfor %}
  behavior:
    scaleUp:
      stabilizationWindowSeconds: 60
    scaleDown:
      # New pods need minutes to load weights: scale down slowly.
      stabilizationWindowSeconds: 600
""",
    "servicemonitor.yaml": """apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
""" + _META.replace("{{ suffix }}", "") + """spec:
  selector:
    matchLabels:
      """ + _SELECTOR + """
  endpoints:
    - port: metrics
      path: /metrics
      interval: 15s
""",
}

KUSTOMIZATION = """# Generated by `generator deploy k8s` (tritonforge {{ version }}).
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
{% for f in files %}
  - {{ f }}
{% endfor %}
""".replace("{% for f in files %}", "{% for f in " + json.dumps(list(FILES)) + " %}")
