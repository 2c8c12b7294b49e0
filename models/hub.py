"""Model ids -> local folders: Hugging Face Hub and ModelScope snapshots.

`resolve_model` is the one place a model id becomes a path; every loader after it
(`load_config`, `load_tokenizer`, `load_model`, `resolve_model_dir`) sees a local path.

- An existing local path (a folder, or a .gguf file) is returned as is; the hub is never
  called for it.
- Otherwise a string shaped like a repo id ("org/name") is downloaded as a snapshot with
  `huggingface_hub.snapshot_download` (hub="hf": honours HF_HOME / HF_TOKEN /
  HF_HUB_OFFLINE by itself) or `modelscope.snapshot_download` (hub="modelscope", imported
  lazily; `pip install 'tritonforge[modelscope]'`; honours MODELSCOPE_CACHE).
- Downloads show progress bars (bytes and files, on stderr) unless `progress=False`: the
  Hub's own bars (which HF_HUB_DISABLE_PROGRESS_BARS also turns off) or ModelScope's per-file
  tqdm bars. modelscope has no switch for its bars, so `progress=False` silences the Hub's
  only.
- Anything else is a ValueError naming the path.

Only what the engine reads is downloaded (ALLOW_PATTERNS): configs (*.json), safetensors,
tokenizer files, the chat template, sentence-transformers modules (1_Pooling/ ...). ONNX,
OpenVINO, TF/Flax (*.h5, *.msgpack), *.pt/*.pth and "original/" / "consolidated*" checkpoints
are never fetched (IGNORE_PATTERNS backs up ALLOW_PATTERNS, whose * also matches folders).
PyTorch .bin and GGUF weights are fallbacks, chosen by retrying rather than by listing the
repo first (one call fewer, and the first pass works offline from the cache):

1. configs + tokenizer + *.safetensors;
2. if that snapshot holds no *.safetensors: also `pytorch_model*.bin` (sharded or not);
3. if there is still no weight file: the repo's listing (`list_repo_files`, hf only); exactly
   one .gguf is downloaded; several are an error naming them (GGUF repos carry one file per
   quantization; download the one you want and pass its path).

Library code reads no environment variables; the edge (engine/llm.py) picks the hub.
Errors are one ValueError line naming the repo id.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

HUBS = ("hf", "modelscope")

# What the engine needs from a repo; see the module docstring for what is left out and why.
ALLOW_PATTERNS = [
    "*.json",  # config, generation config, tokenizer config, safetensors index, modules.json
    "*.safetensors",
    "tokenizer.model", "*.tiktoken", "spiece.model", "sentencepiece.bpe.model",
    "vocab.*", "merges.txt", "*.txt",  # BPE / WordPiece vocabularies
    "*.jinja",  # chat templates saved next to the tokenizer
    "1_Pooling/*",  # sentence-transformers pooling config
]
# Never fetched even where an allow pattern matches (fnmatch's * crosses folders): other
# runtimes' exports, and Mistral/Meta "consolidated" checkpoints that duplicate the HF shards.
IGNORE_PATTERNS = ["onnx/*", "openvino/*", "original/*", "consolidated*"]
BIN_PATTERNS = ["pytorch_model*.bin"]
REMOTE_CODE_PATTERNS = ["*.py"]  # only with trust_remote_code

# org/name: HF's rules (letters, digits, - _ .), not starting with '.' or '-', no '..'.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9_][\w.-]{0,95}$")


def looks_like_repo_id(model: str | Path) -> bool:
    text = str(model)
    return (not isinstance(model, Path) and bool(_REPO_ID.match(text)) and ".." not in text
            and not text.endswith((".", "-")))


def _weight_files(folder: Path) -> dict[str, list[Path]]:
    return {
        "safetensors": sorted(folder.glob("*.safetensors")),
        "bin": sorted(folder.glob("pytorch_model*.bin")),
        "gguf": sorted(folder.glob("*.gguf")),
    }


def _connection_errors() -> tuple[type[BaseException], ...]:
    """OSError covers requests' ConnectionError, OfflineModeIsEnabled and HfHubHTTPError;
    httpx (huggingface_hub >= 1.0's transport; packaged as httpx2 here and there) has its
    own TransportError, which is not an OSError."""
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx", "httpx2"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        if isinstance(getattr(module, "TransportError", None), type):
            errors.append(module.TransportError)
    return tuple(errors)


def _hf_error_message(repo_id: str, revision: str | None, err: BaseException) -> str:
    from huggingface_hub import errors as hf_errors

    rev = f" at revision {revision!r}" if revision else ""
    # Order matters: GatedRepoError is a RepositoryNotFoundError; LocalEntryNotFoundError
    # and OfflineModeIsEnabled are OSErrors.
    if isinstance(err, hf_errors.GatedRepoError):
        return (f"model {repo_id!r}: the Hugging Face repository is gated; accept its terms on "
                "huggingface.co and log in (hf auth login, or set HF_TOKEN)")
    if isinstance(err, hf_errors.RepositoryNotFoundError):
        return (f"model {repo_id!r}: no such Hugging Face repository (or it is private: log "
                "in with hf auth login, or set HF_TOKEN), and no such local path")
    if isinstance(err, hf_errors.RevisionNotFoundError):
        return f"model {repo_id!r}: revision {revision!r} not found on the Hugging Face Hub"
    if isinstance(err, hf_errors.OfflineModeIsEnabled):
        return (f"model {repo_id!r}{rev}: not in the local Hugging Face cache and "
                "HF_HUB_OFFLINE is set")
    if isinstance(err, hf_errors.LocalEntryNotFoundError):
        return (f"model {repo_id!r}{rev}: cannot reach the Hugging Face Hub and the model is "
                "not in the local cache (HF_HOME)")
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return (f"model {repo_id!r}{rev}: download from the Hugging Face Hub failed "
            f"({type(err).__name__}: {first_line})")


def silent_tqdm() -> type:
    """A tqdm class that never draws: the Hub aggregates every file's progress into bars of
    the class it is given, so this one class silences a whole snapshot."""
    from tqdm.auto import tqdm

    class SilentTqdm(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return SilentTqdm


def _hf_snapshot(repo_id: str, revision: str | None, download: bool,
                 cache_dir: str | Path | None, progress: bool) -> Callable[[list[str]], Path]:
    import huggingface_hub

    # None: the Hub's own bars (bytes downloaded, files), on unless HF_HUB_DISABLE_PROGRESS_BARS.
    tqdm_class = None if progress else silent_tqdm()

    def fetch(patterns: list[str]) -> Path:
        return Path(huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, ignore_patterns=IGNORE_PATTERNS,
            cache_dir=cache_dir, local_files_only=not download, tqdm_class=tqdm_class,
        ))

    return fetch


def _hf_list(repo_id: str, revision: str | None) -> list[str]:
    import huggingface_hub

    return list(huggingface_hub.list_repo_files(repo_id, revision=revision))


def _modelscope_snapshot(repo_id: str, revision: str | None, download: bool,
                         cache_dir: str | Path | None, progress: bool
                         ) -> Callable[[list[str]], Path]:
    try:
        import modelscope
    except ImportError as err:
        raise ValueError(
            f"model {repo_id!r}: hub='modelscope' needs the modelscope package: "
            "pip install 'tritonforge[modelscope]'"
        ) from err

    def fetch(patterns: list[str]) -> Path:
        kwargs: dict[str, Any] = {"revision": revision, "allow_patterns": patterns,
                                  "ignore_patterns": IGNORE_PATTERNS}
        if cache_dir is not None:
            kwargs["cache_dir"] = str(cache_dir)
        if not download:
            kwargs["local_files_only"] = True
        return Path(modelscope.snapshot_download(repo_id, **kwargs))

    return fetch


def _download(repo_id: str, revision: str | None, hub: str, download: bool,
              cache_dir: str | Path | None, trust_remote_code: bool, progress: bool) -> Path:
    make = _hf_snapshot if hub == "hf" else _modelscope_snapshot
    fetch = make(repo_id, revision, download, cache_dir, progress)
    base = ALLOW_PATTERNS + (REMOTE_CODE_PATTERNS if trust_remote_code else [])
    folder = fetch(base)
    if not _weight_files(folder)["safetensors"]:
        folder = fetch(base + BIN_PATTERNS)
    if any(_weight_files(folder).values()):
        return folder
    if hub == "hf" and download:
        ggufs = sorted(f for f in _hf_list(repo_id, revision) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return fetch(base + ggufs)
        if ggufs:
            raise ValueError(
                f"model {repo_id!r}: the repository holds {len(ggufs)} .gguf files "
                f"({', '.join(ggufs[:6])}{', ...' if len(ggufs) > 6 else ''}); download the "
                "one you want (hf download REPO FILE) and pass its path"
            )
    raise ValueError(
        f"model {repo_id!r}: the {hub} snapshot at {folder} has no weights (*.safetensors, "
        "pytorch_model*.bin or a single .gguf)"
    )


def resolve_model(model: str | Path, revision: str | None = None, hub: str = "hf",
                  download: bool = True, cache_dir: str | Path | None = None,
                  trust_remote_code: bool = False, progress: bool = True) -> Path:
    """The local path of `model`: as given when it exists, else a hub snapshot folder.

    revision: a branch, tag or commit (hub default branch when None); download=False uses
    the local cache only; cache_dir: None is the hub's own default (HF_HOME / MODELSCOPE_CACHE);
    trust_remote_code additionally fetches the repo's *.py files; progress=False hides the
    Hugging Face download bars (quiet callers). One-line ValueError when the path does not
    exist and the id cannot be resolved.
    """
    if hub not in HUBS:
        raise ValueError(f"hub must be one of {', '.join(HUBS)}; got {hub!r}")
    if not isinstance(model, (str, Path)) or not str(model):
        raise ValueError(f"model must be a model id or a path; got {model!r}")
    path = Path(model).expanduser()
    if path.exists():
        return path
    if not looks_like_repo_id(model):
        raise ValueError(
            f"model {str(model)!r}: {path} does not exist (and is not a hub repo id of the "
            "form org/name)"
        )
    repo_id = str(model)
    if hub == "modelscope":
        try:
            return _download(repo_id, revision, hub, download, cache_dir, trust_remote_code,
                             progress)
        except ValueError:
            raise
        except Exception as err:  # modelscope raises assorted types; keep it one line
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(
                f"model {repo_id!r}: download from ModelScope failed "
                f"({type(err).__name__}: {first_line})"
            ) from err
    from huggingface_hub import errors as hf_errors

    handled = (hf_errors.HfHubHTTPError, hf_errors.LocalEntryNotFoundError,
               hf_errors.OfflineModeIsEnabled, hf_errors.HFValidationError,
               *_connection_errors())
    try:
        return _download(repo_id, revision, hub, download, cache_dir, trust_remote_code,
                         progress)
    except handled as err:  # (HFValidationError is a ValueError; ours are not handled here)
        raise ValueError(_hf_error_message(repo_id, revision, err)) from err
