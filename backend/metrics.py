"""The generate model's Prometheus metrics, under vllm_backend's names, on Triton's /metrics.

Families (labels `model` and `version`, as vllm_backend sets them, and `model_instance`,
see `metric_labels`):
  counters    vllm:prompt_tokens_total, vllm:generation_tokens_total,
              vllm:num_preemptions_total
  histograms  vllm:time_to_first_token_seconds (one observation per request),
              vllm:time_per_output_token_seconds (one per output token after the first:
              the time since the previous token, as vLLM's iteration stats observe it),
              vllm:e2e_request_latency_seconds (one per finished request); vLLM's buckets;
              vllm:request_prompt_tokens (one per finished request),
              vllm:request_generation_tokens (one per finished completion: n per request),
              vllm:request_params_n (one per finished request), vllm_backend's buckets
  gauges      vllm:num_requests_running, vllm:num_requests_waiting (queued in the engine
              or not yet admitted), vllm:kv_cache_usage_perc (fraction of KV blocks held by
              requests; 1 means 100%; cached free prefix blocks do not count)

  ours        tritonforge:metrics_dropped_observations_total: histogram observations
              dropped because reporting fell behind (backend/metric_events.py)

Every metric call is a round trip to the Triton process (~50 us here, up to a GIL switch
interval in a busy stub), so the engine thread only queues events; one thread applies them
(backend/metric_events.py: counters summed and first, observations from a bounded backlog)
and refreshes the gauges from engine stats every `interval` seconds. If the
server runs with metrics off, or the model's config sets the parameter
REPORT_CUSTOM_METRICS to anything but "true" (vllm_backend's switch; our generator renders
"true"), every call is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import triton_python_backend_utils as pb_utils
from tritonforge.backend.metric_events import MetricEvents
from tritonforge.backend.triton_io import log_exception, log_info, log_warning

# vLLM's buckets (vllm/engine/metrics.py), as vllm_backend uses them.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0]
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
N_BUCKETS = [1, 2, 5, 10, 20]
# The model config parameter that turns the vllm:* metrics on, as in vllm_backend.
REPORT_SWITCH = "REPORT_CUSTOM_METRICS"


def buckets_1_2_5(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    out, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return out
            out.append(value)
        exponent += 1


def metrics_enabled(model_config: dict[str, Any]) -> bool:
    """vllm_backend's rule: the parameter REPORT_CUSTOM_METRICS is "true" (any case).
    Absent (a repository built before the generator wrote it) is off too, as there; that
    is logged as a warning, since dashboards and autoscalers read these metrics."""
    setting = model_config.get("parameters", {}).get(REPORT_SWITCH)
    if setting is None:
        log_warning(f"the model config has no parameter {REPORT_SWITCH}: the vllm:* metrics "
                    "are off (as in vllm_backend); set it to \"true\" or rebuild the "
                    "repository with `generator build` to report them")
        return False
    return str(setting.get("string_value", "")).strip().lower() == "true"


def metric_labels(public_name: str, args: dict[str, Any]) -> dict[str, str]:
    """The labels of one model instance's metrics: vllm_backend's `model` (the public name)
    and `version`, plus `model_instance`, unique to this stub process.

    Why the third label: Triton's core (2.51) hands every Metric created with the same
    family name and labels the same Prometheus object, and frees it when the first of them
    is deleted. A reload loads the new instance before it unloads the old one, so with
    labels {model, version} alone the new instance kept reporting into an object the old
    one's finalize() freed, and tritonserver died in prometheus::Histogram::Observe within
    seconds of a reload under traffic (issue 26). Two instances of one model (instance
    count > 1) collided the same way and overwrote each other's gauges. Queries that sum
    by model (`sum by (model) (...)`) see one series per instance; the pid in the value
    differs between an instance and the one that replaces it."""
    instance = f"{args.get('model_instance_name', 'instance')}@{os.getpid()}"
    return {"model": public_name, "version": str(args.get("model_version", "")),
            "model_instance": instance}


@dataclass
class GaugeValues:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions_total: int


class GenerateMetrics:
    """Queue events from any thread; a daemon thread reports them to Triton."""

    def __init__(self, labels: dict[str, str], gauges: Callable[[], GaugeValues],
                 max_model_len: int, interval: float = 0.25, enabled: bool = True) -> None:
        self._gauges = gauges
        self._max_model_len = max_model_len
        self._families: dict[str, Any] = {}
        self._metrics: dict[str, Any] = {}
        self._preemptions = 0
        self._events: MetricEvents | None = None
        if not enabled:
            log_info(f"{REPORT_SWITCH} is not \"true\" in the model config: the vllm:* "
                     "metrics are not reported")
            return
        try:
            self._create(labels)
        except pb_utils.TritonModelException as err:
            if "metrics not supported" not in str(err).lower():
                raise
            log_info("Triton runs with metrics off; the generate metrics are not reported")
            self._metrics.clear()
        if self._metrics:
            self._events = MetricEvents(self._apply, self._refresh_gauges, interval,
                                        dropped_key="dropped")

    def _create(self, labels: dict[str, str]) -> None:
        kinds = pb_utils.MetricFamily
        specs = [
            ("prompt_tokens", "vllm:prompt_tokens_total", "Number of prefill tokens processed.",
             kinds.COUNTER, None),
            ("generation_tokens", "vllm:generation_tokens_total",
             "Number of generation tokens processed.", kinds.COUNTER, None),
            ("preemptions", "vllm:num_preemptions_total",
             "Cumulative number of preemptions from the engine.", kinds.COUNTER, None),
            ("ttft", "vllm:time_to_first_token_seconds",
             "Histogram of time to first token in seconds.", kinds.HISTOGRAM, TTFT_BUCKETS),
            ("tpot", "vllm:time_per_output_token_seconds",
             "Histogram of time per output token in seconds.", kinds.HISTOGRAM, TPOT_BUCKETS),
            ("e2e", "vllm:e2e_request_latency_seconds",
             "Histogram of end to end request latency in seconds.", kinds.HISTOGRAM,
             E2E_BUCKETS),
            ("request_prompt_tokens", "vllm:request_prompt_tokens",
             "Number of prefill tokens processed.", kinds.HISTOGRAM,
             buckets_1_2_5(self._max_model_len)),
            ("request_generation_tokens", "vllm:request_generation_tokens",
             "Number of generation tokens processed.", kinds.HISTOGRAM,
             buckets_1_2_5(self._max_model_len)),
            ("request_params_n", "vllm:request_params_n",
             "Histogram of the n request parameter.", kinds.HISTOGRAM, N_BUCKETS),
            ("running", "vllm:num_requests_running", "Number of requests currently running.",
             kinds.GAUGE, None),
            ("waiting", "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
             kinds.GAUGE, None),
            ("kv_usage", "vllm:kv_cache_usage_perc",
             "KV-cache usage. 1 means 100 percent usage.", kinds.GAUGE, None),
            ("dropped", "tritonforge:metrics_dropped_observations_total",
             "Histogram observations dropped because metric reporting fell behind.",
             kinds.COUNTER, None),
        ]
        for key, name, description, kind, buckets in specs:
            family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
            self._families[key] = family
            self._metrics[key] = (family.Metric(labels=labels) if buckets is None
                                  else family.Metric(labels=labels, buckets=buckets))

    # ---- events (any thread; cheap) ------------------------------------------------------
    def _put(self, key: str, op: str, value: float) -> None:
        if self._events is not None:  # off: nothing would read the queue, so nothing goes in
            self._events.put(key, op, value)

    def add_tokens(self, prompt: int = 0, generation: int = 0) -> None:
        if prompt:
            self._put("prompt_tokens", "increment", float(prompt))
        if generation:
            self._put("generation_tokens", "increment", float(generation))

    def observe_ttft(self, seconds: float) -> None:
        self._put("ttft", "observe", seconds)

    def observe_tpot(self, seconds: float) -> None:
        self._put("tpot", "observe", seconds)

    def observe_e2e(self, seconds: float) -> None:
        self._put("e2e", "observe", seconds)

    def observe_finished(self, prompt_tokens: int, generation_tokens: list[int]) -> None:
        """A finished request: its prompt length, each completion's length, and n."""
        self._put("request_prompt_tokens", "observe", float(prompt_tokens))
        for count in generation_tokens:
            self._put("request_generation_tokens", "observe", float(count))
        self._put("request_params_n", "observe", float(len(generation_tokens)))

    # ---- the reporting thread (MetricEvents calls these) --------------------------------
    def _apply(self, key: str, op: str, value: float) -> None:
        try:
            getattr(self._metrics[key], op)(value)
        except Exception:  # noqa: BLE001 - a metric must never take serving down
            log_exception(f"could not report metric {key}")

    def _refresh_gauges(self) -> None:
        try:
            values = self._gauges()
        except Exception:  # noqa: BLE001
            log_exception("could not read engine stats for the gauges")
            return
        self._apply("running", "set", float(values.num_running))
        self._apply("waiting", "set", float(values.num_waiting))
        self._apply("kv_usage", "set", float(values.kv_cache_usage))
        if values.num_preemptions_total > self._preemptions:
            self._apply("preemptions", "increment",
                        float(values.num_preemptions_total - self._preemptions))
            self._preemptions = values.num_preemptions_total

    def close(self) -> None:
        """Reports what is queued, stops the thread, and deletes the metrics before their
        families (the Python backend requires that order)."""
        if self._events is not None:
            if not self._events.close(timeout=10):
                # Deleting metrics the thread may still be calling into would break the
                # backend's rule (no metric call after its delete); the process ends soon.
                log_exception("the metrics thread did not stop; its metrics are left as they are")
                return
            self._events = None
        self._metrics.clear()
        self._families.clear()
