"""Downstream task accuracy through lm-evaluation-harness, for a model already in memory.

Offline first: countdown ships small multiple-choice tasks in lm-eval's own YAML format under
``countdown/tasks/`` (real BIG-bench examples from the PyPI ``bigbench`` 1.0.0 sdist, see
``countdown/tasks/README.md``); their names start with ``countdown_``.  Any other lm-eval task name
(``arc_easy``, ``hellaswag``, ...) is passed to lm-eval's own registry, which needs the Hugging Face
Hub to download its data.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_PREFIX = "countdown_"
LM_EVAL_INSTALL = 'pip install "lm-eval==0.4.13"'
_TASK_LINE = re.compile(r"^task:\s*(\S+)\s*$", re.MULTILINE)
_TAG_ITEM = re.compile(r"^\s+-\s+(countdown\w*)\s*$", re.MULTILINE)


def _require_lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"downstream tasks need lm-evaluation-harness, which is not installed: {LM_EVAL_INSTALL}"
        ) from e
    return lm_eval


def available_tasks() -> list[str]:
    """Names of the tasks countdown ships for offline use (lm-eval need not be installed)."""
    names = []
    for path in sorted(TASKS_DIR.glob("*/*.yaml")):
        m = _TASK_LINE.search(path.read_text())
        if m:
            names.append(m.group(1))
    return sorted(names)


@functools.lru_cache(maxsize=2)
def _task_manager(include_defaults: bool) -> Any:
    """lm-eval's task index over our folder (plus lm-eval's own tasks if asked); cached, as
    indexing lm-eval's ~15k bundled YAMLs takes several seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)


def _check_known(unknown: list[str], local: set[str]) -> None:
    if unknown:
        raise ValueError(
            f"unknown task(s) {', '.join(unknown)}; offline tasks shipped with countdown: "
            f"{', '.join(sorted(local))}; other names must be lm-eval tasks "
            "(list them with `lm_eval ls tasks`) and need the Hugging Face Hub"
        )


def _local_tags() -> set[str]:
    """Tags our task templates define (``countdown``, ``countdown_mc``, ``countdown_cloze``)."""
    return {m for p in TASKS_DIR.glob("_*_yaml") for m in _TAG_ITEM.findall(p.read_text())}


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):  # lm-eval writes "N/A" where it has no stderr
        return math.nan


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy of an in-memory ``transformers`` causal LM on lm-eval tasks.

    ``tasks``: names from :func:`available_tasks` or the tags ``countdown``, ``countdown_mc``,
    ``countdown_cloze`` (offline), or any task, group or tag that lm-eval knows (their data come
    from the Hugging Face Hub).  ``limit``: first N examples of each task (None = all).  ``device``: if given, the model is moved there first (in place);
    otherwise it is evaluated where it is.

    Returns ``{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}}`` (a metric the
    task does not report is NaN; ``n`` is the number of examples scored).
    """
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of examples or None, got {limit}")
    lm_eval = _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    local = set(available_tasks())
    others = [t for t in tasks if t not in local | _local_tags()]
    # The countdown_ prefix is ours: such a name that is not shipped is a typo, no need to ask lm-eval.
    _check_known([t for t in others if t.startswith(LOCAL_PREFIX)], local)
    # lm-eval's own registry is only indexed when a non-countdown task is asked for.
    manager = _task_manager(bool(others))
    _check_known([t for t in others if t not in manager.all_tasks], local)

    if device is not None:
        model.to(device)
    was_training = bool(getattr(model, "training", False))
    model.eval()  # restored below: dropout off while scoring
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            limit=limit,
            task_manager=manager,
            log_samples=False,
        )
    except Exception as e:
        if others:
            raise RuntimeError(
                f"lm-eval failed on {', '.join(tasks)}; the non-countdown task(s) {', '.join(others)} "
                f"download their data from the Hugging Face Hub, which may be unreachable "
                f"(offline tasks: {', '.join(sorted(local))}): {type(e).__name__}: {e}"
            ) from e
        raise
    finally:
        if was_training:
            model.train()
    assert out is not None  # single process: lm-eval returns None only on non-zero ranks

    n_samples = out.get("n-samples", {})
    results: dict[str, dict[str, float]] = {}
    for name, res in out["results"].items():
        if "acc,none" not in res:
            continue
        results[name] = {
            "acc": _float(res.get("acc,none")),
            "acc_stderr": _float(res.get("acc_stderr,none")),
            "acc_norm": _float(res.get("acc_norm,none")),
            "acc_norm_stderr": _float(res.get("acc_norm_stderr,none")),
            "n": float(n_samples.get(name, {}).get("effective", math.nan)),
        }
    return results
