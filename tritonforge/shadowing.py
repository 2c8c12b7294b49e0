"""Our top-level folders never stand in for the installed packages that share their names.

The repository's folders `kernels`, `models`, `engine`, `backend` and `generator` are
installed as `tritonforge.kernels`, ... (pyproject's package-dir). But Python puts the
current folder first on sys.path for `python -m ...`, `python -c ...` and pytest's
`pythonpath`, so from the repository root a plain `import kernels` would find our folder
ahead of site-packages, and transformers (>= 5.25 imports Hugging Face's `kernels`) broke at
import. Every such folder's `__init__` therefore starts with:

    if __name__ != "tritonforge.kernels":
        from tritonforge.shadowing import defer_to_installed
        defer_to_installed(__name__, __file__)

so when it is imported under its bare name it loads, in its place, the package of that name
found on sys.path outside the repository. The import system returns whatever sys.modules
holds once the module body ends, so the caller gets the installed package.

Where no such package is installed, the caller gets an empty package with no file and no
version (what Python makes of an empty namespace folder), never our code: `from kernels
import x` then fails with an ImportError. Not a ModuleNotFoundError from the import itself,
because importlib.util.find_spec still finds our folder, and transformers' availability
check (5.17: `_is_package_available`) imports whatever find_spec found, outside any try,
and takes a module without a version and a file for "not installed".

This guards every entry point at once: tests, benchmarks, the CLI, Triton's Python-backend
stubs and `python -c` from the repository root.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path


def _same_folder(entry: str, root: Path) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() == root
    except OSError:
        return False


def defer_to_installed(name: str, init_file: str) -> None:
    """Make `import NAME` give the installed package NAME instead of our folder NAME (whose
    `__init__` is `init_file`); an empty package when no other NAME is installed."""
    root = Path(init_file).resolve().parent.parent
    # sys.path without the repository root: '' and '.' are the current folder.
    search = [entry for entry in sys.path if not _same_folder(entry, root)]
    spec = importlib.machinery.PathFinder.find_spec(name, search)
    if spec is None or spec.loader is None:
        empty = importlib.machinery.ModuleSpec(name, None, is_package=True)
        module = importlib.util.module_from_spec(empty)  # no __file__, __path__ == []
        module.__doc__ = (f"Nothing named {name!r} is installed; the repository's {name}/ "
                          f"folder is tritonforge.{name} (tritonforge/shadowing.py).")
        sys.modules[name] = module
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
