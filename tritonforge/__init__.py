"""tritonforge: serve Hugging Face models on NVIDIA Triton Inference Server.

The distribution installs one import package, `tritonforge`, whose subpackages are the
repository's top-level folders (kernels, models, engine, backend, generator,
model_repo_templates); see pyproject.toml's package-dir mapping.
"""

__version__ = "0.1.0"
