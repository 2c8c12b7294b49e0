"""Prints the versions CI resolved for the packages a break usually comes from, one per
line (`name version`, or `name -` when absent): each lane prints its own, and .ci/run names
the packages whose versions differ when only one lane fails."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("torch", "triton", "transformers", "tokenizers", "huggingface_hub", "kernels",
            "tritonclient", "nvidia-pytriton", "numpy", "safetensors", "sentence-transformers",
            "gguf", "accelerate", "jinja2", "protobuf", "grpcio")

for name in PACKAGES:
    try:
        print(name, version(name))
    except PackageNotFoundError:
        print(name, "-")
