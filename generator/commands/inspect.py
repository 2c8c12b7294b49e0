"""`generator inspect`: what a model is and what serving it costs, from its config files only
(parameters and shapes from the model built on the meta device: no weights are read)."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from tritonforge.generator import model_source
from tritonforge.generator.model_info import DTYPES, ModelInfo, describe

EPILOG = """examples:
  generator inspect Qwen/Qwen3-0.6B                     config files only, no weights
  generator inspect ./my-model --dtype float16          a local folder, memory in fp16
  generator inspect ./SmolLM2-135M-Instruct.Q4_1.gguf   GGUF metadata
  generator inspect BAAI/bge-small-en-v1.5 --json       for scripts
  generator inspect qwen/Qwen3-0.6B --hub modelscope    from ModelScope
"""


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    parser = sub.add_parser(
        name, help="show a model's architecture, tasks, pooling, size and memory needs",
        description="Read a model's config.json (and sentence-transformers / tokenizer files) "
        "from a local folder, a .gguf file, the Hugging Face Hub or ModelScope, without "
        "downloading weights, and show how tritonforge would serve it. Parameters and shapes "
        "come from the model's modules built on PyTorch's meta device (no memory, a few "
        "seconds); where that build is impossible (remote code, a class transformers lacks) "
        "a formula estimates them, and the output says so.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="dtype for the memory numbers (default: the config's, else bfloat16)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="a local folder or .gguf file, or a hub id (org/name)")
    parser.add_argument("--revision", help="hub branch, tag or commit (default: main)")
    parser.add_argument("--hub", choices=model_source.HUBS, default=None,
                        help="where hub ids live (default: hf; modelscope when "
                             "TRITONFORGE_USE_MODELSCOPE=1)")


def run(args: argparse.Namespace) -> int:
    ref = model_source.resolve(args.model, args.hub or model_source.default_hub(), args.revision)
    with model_source.fetch_config(ref) as folder:
        info = describe(folder, args.model, ref.hub, args.dtype, measure=True)
    if args.json:
        print(json.dumps(info.to_json(), indent=2))
    else:
        Console().print(info_table(info))
    return 0


def human_bytes(value: int | None) -> str:
    if value is None:
        return "unknown"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return str(value)


def human_count(value: int | None) -> str:
    if value is None:
        return "unknown"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit} ({value:,})"
    return f"{value:,}"


def info_table(info: ModelInfo) -> Table:
    table = Table(title=f"{info.model}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    tasks = ", ".join(f"{t} ({info.implementations[t]})" for t in info.tasks) or "none"
    kv = kv_cache_text(info)
    rows = [
        ("source", f"{info.source} ({info.format})"),
        ("architecture", f"{info.architecture} (model_type {info.model_type})"),
        ("implementation", info.implementation),
        ("tasks", tasks),
        ("default task", info.default_task or f"none: {info.task_note}"),
        ("pooling", (info.pooling or "-") + (" + normalize" if info.normalize else "")),
        ("labels", ", ".join(info.labels) if info.labels else "-"),
        ("layers / hidden / heads / kv heads / head dim",
         " / ".join(_known(v) for v in (info.num_layers, info.hidden_size,
                                        info.num_attention_heads, info.num_kv_heads,
                                        info.head_dim))),
        ("max model len", _known(info.max_model_len)),
        ("chat template", "yes" if info.has_chat_template else "no"),
        ("parameters", f"{human_count(info.num_params)} [{info.params_source}]"),
        ("weight memory", f"{human_bytes(info.weight_bytes)} ({info.dtype})"),
        ("KV cache", kv),
    ]
    if info.num_active_params is not None:
        after = [key for key, _ in rows].index("parameters") + 1
        rows.insert(after, (
            "active parameters", f"{human_count(info.num_active_params)} per token "
                                 "(the routed experts it picks and every other weight)"))
    if info.model_kind:
        rows.insert(2, ("kind", info.model_kind))
    if info.auto_map:
        rows.append(("remote code", "config asks for it (auto_map): needs --trust-remote-code"))
    for key, value in rows:
        table.add_row(key, escape(value))
    return table


def kv_cache_text(info: ModelInfo) -> str:
    per_token = info.kv_cache_bytes_per_token
    if per_token:
        text = f"{human_bytes(per_token)} / token ({info.dtype}) when generating"
        if info.default_task != "generate":
            text += f"; {info.default_task or 'a pooling task'} allocates none"
        return text
    if info.tasks:
        return "none (pooling models allocate no KV cache)"
    return "none (no task here)"


def _known(value: int | None) -> str:
    return "unknown" if value is None else str(value)
