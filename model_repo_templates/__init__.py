"""Jinja2 templates of Triton model folders, one folder per template.

Each template folder mirrors a Triton model folder: `config.pbtxt.j2` and `1/model.py.j2`.
The rendered model.py files are thin shims that import tritonforge.backend. This package
exists (with this file) so importlib.resources finds the templates under editable installs.
"""
