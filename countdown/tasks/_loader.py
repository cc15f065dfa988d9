"""Dataset loader used by the countdown task YAMLs (lm-eval ``custom_dataset`` hook).

lm-eval resolves ``dataset_kwargs.data_files`` of a plain ``dataset_path: json`` task
against the current working directory, so a task shipped inside a package could only
name an absolute path.  The YAMLs here therefore keep the usual
``dataset_kwargs: {data_files: ...}`` block but route it through this function, which
resolves the paths relative to this folder and then calls ``datasets.load_dataset("json")``
exactly as lm-eval would.  Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent


def _resolve(path: str) -> str:
    p = Path(path)
    return str(p if p.is_absolute() else TASKS_DIR / p)


def load_local_json(data_files: str | list[str] | dict[str, Any] | None = None, **_: Any) -> Any:
    """Load shipped JSON-lines files as a ``datasets.DatasetDict`` (extra lm-eval metadata is ignored)."""
    import datasets

    if data_files is None:
        raise ValueError("countdown local task: dataset_kwargs.data_files is required")
    if isinstance(data_files, dict):
        files: Any = {
            split: ([_resolve(f) for f in v] if isinstance(v, list) else _resolve(v))
            for split, v in data_files.items()
        }
    elif isinstance(data_files, list):
        files = [_resolve(f) for f in data_files]
    else:
        files = _resolve(data_files)
    return datasets.load_dataset("json", data_files=files)
