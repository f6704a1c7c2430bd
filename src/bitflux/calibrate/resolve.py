"""What `bitflux calibrate SRC` may name, resolved to a transformer directory and a pipeline.

Accepted like `bitflux quantize`: a bundled name, a pipeline directory (model_index.json), a bare
transformer directory (config.json) with `--base PIPELINE` (or with prompt embeddings already
cached in the work dir), or a hub id. Hub ids are looked up in the local Hugging Face cache only:
bitflux never downloads weights, so an uncached id fails at once with one line (naming
HF_HUB_OFFLINE when it is set), not after a network timeout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError


@dataclass(frozen=True)
class CalibSource:
    """Where a calibration's teacher and its text encoders live."""

    transformer: str  # directory of the full-precision transformer (config.json + safetensors)
    pipeline: str | None  # pipeline directory giving text encoders and scheduler (None: cached embeddings)


def _hub_snapshot(repo: str) -> Path:
    """The local snapshot of a hub repo, never downloading."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError and friends: not cached
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "bitflux never downloads weights"
        raise ModelError(
            f"{repo}: not in the local Hugging Face cache ({why}); download it first "
            f"(huggingface-cli download {repo}) or pass its directory"
        ) from None


def _pipeline_dir(name: str) -> str:
    from ..pipeline import bundled, is_hub_id

    path = bundled(name) or Path(name)
    if not path.exists() and is_hub_id(name):
        path = _hub_snapshot(name)
    if not (path / "model_index.json").is_file():
        raise ModelError(f"--base {name}: not a diffusers pipeline directory (no model_index.json)")
    return str(path)


def resolve_source(src: str, base: str | None = None) -> CalibSource:
    """Classify SRC; `base` names the pipeline whose text encoders and scheduler a bare transformer uses."""
    from ..checkpoint import is_bitflux_dir
    from ..pipeline import bundled, is_hub_id

    path = bundled(src) or Path(src)
    if not path.exists():
        if not is_hub_id(src):
            raise ModelError(f"no such model: {src} (not a bundled name, directory or hub id)")
        path = _hub_snapshot(src)
    if not path.is_dir():
        raise ModelError(f"{src}: not a directory")
    if (path / "model_index.json").is_file():
        transformer, pipeline = path / "transformer", str(path)
    elif (path / "config.json").is_file():
        transformer, pipeline = path, None
    else:
        raise ModelError(f"{src}: not a diffusers pipeline or transformer directory (no model_index.json or config.json)")
    if is_bitflux_dir(transformer):
        raise ModelError(f"{src}: already quantised; calibrate needs the full-precision model")
    if base is not None:
        pipeline = _pipeline_dir(base)
    return CalibSource(str(transformer), pipeline)
