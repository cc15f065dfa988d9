"""Downstream task accuracy through lm-evaluation-harness, for a model already in memory.

Offline first: countdown ships small multiple-choice tasks in lm-eval's own YAML format under
``countdown/tasks/`` (real BIG-bench examples from the PyPI ``bigbench`` 1.0.0 sdist, see
``countdown/tasks/README.md``); their names start with ``countdown_``.  Any other lm-eval task name
(``arc_easy``, ``hellaswag``, ...) is passed to lm-eval's own registry, which needs the Hugging Face
Hub to download its data (or its local cache): `check_task_data` says which dataset is missing before
any model work. ``"paper"`` stands for the COUNTDOWN paper's tasks, `PAPER_TASKS`.

Which positions are sparse follows the model's `SparsitySpec.positions`. With ``"decode"`` a
log-likelihood request runs its context densely and its continuation sparsely, as the official
COUNTDOWN harness does (its ``sparse_out_mask[i, :len(context)] = False``): the first continuation
token is predicted by the last context position, which is dense, and the later ones by sparse
positions. Generative tasks (gsm8k) prefill densely and decode sparsely. Each task result of a sparse
model says which fraction of its scored tokens came from a dense position (``dense_scored``). The
lm-eval model doing this is `countdown.lm_eval_model.CountdownLM`, registered as ``model="countdown"``.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any

from .hub import unreachable_reason as hub_unreachable_reason

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_PREFIX = "countdown_"
LM_EVAL_INSTALL = 'pip install "lm-eval==0.4.13"'
_TASK_LINE = re.compile(r"^task:\s*(\S+)\s*$", re.MULTILINE)
_TAG_ITEM = re.compile(r"^\s+-\s+(countdown\w*)\s*$", re.MULTILINE)

# The COUNTDOWN paper's downstream tasks, as the official scripts run them (scripts/prob.sh): seven
# zero-shot log-likelihood tasks and gsm8k with chain of thought (generative: sparse decode).
PAPER_TASKS = ("arc_easy", "arc_challenge", "winogrande", "piqa", "openbookqa", "hellaswag", "truthfulqa_mc1",
               "gsm8k_cot")
PAPER_ALIAS = "paper"
# dataset builders that read local files rather than a Hub repository
_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}


class TaskDataUnavailable(ValueError):
    """An lm-eval task's data are neither in the local Hugging Face cache nor reachable on the Hub."""


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


def task_manager(include_defaults: bool = False) -> Any:
    """An lm-eval ``TaskManager`` that knows countdown's offline tasks (and lm-eval's own with
    ``include_defaults``): pass it as ``lm_eval.simple_evaluate(..., task_manager=task_manager())``."""
    _require_lm_eval()
    return _task_manager(include_defaults)


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


def expand_tasks(tasks: list[str]) -> list[str]:
    """``tasks`` with the alias ``"paper"`` replaced by `PAPER_TASKS` (order kept, no duplicates)."""
    out: list[str] = []
    for t in tasks:
        out += [p for p in (PAPER_TASKS if t == PAPER_ALIAS else (t,)) if p not in out]
    return out


def task_datasets(tasks: list[str]) -> dict[str, list[str]]:
    """{leaf task: ["owner/name (config 'x')", ...]}: the Hugging Face datasets lm-eval will load for
    ``tasks`` (groups and tags expanded); countdown's offline tasks and local files need none."""
    _require_lm_eval()
    local = set(available_tasks()) | _local_tags()
    others = [t for t in expand_tasks(tasks) if t not in local]
    if not others:
        return {}
    index = _task_manager(True).task_index
    unknown = [t for t in others if t not in index]
    if unknown:
        raise ValueError(f"unknown task {', '.join(map(repr, unknown))}: neither one of countdown's offline tasks "
                         f"(`countdown tasks`), '{PAPER_ALIAS}', nor an lm-eval task, group or tag")
    out: dict[str, list[str]] = {}

    def visit(name: str, depth: int) -> None:
        entry = index.get(name)
        if entry is None or depth > 8 or name in out:
            return
        kind = entry.kind.name
        if kind == "TAG":
            for member in sorted(entry.tags):
                visit(member, depth + 1)
        elif kind == "GROUP":
            for member in (entry.cfg or {}).get("task", []):
                visit(member if isinstance(member, str) else member.get("task", ""), depth + 1)
        elif entry.cfg is not None:
            path, config = entry.cfg.get("dataset_path"), entry.cfg.get("dataset_name")
            if isinstance(path, str) and not _is_local_dataset(path, entry.cfg):
                out[name] = [path + (f" (config {config!r})" if config else "")]

    for name in others:
        visit(name, 0)
    return out


def _is_local_dataset(path: str, cfg: dict) -> bool:
    return path in _LOCAL_BUILDERS or "custom_dataset" in cfg or Path(path).expanduser().exists()


def _in_local_cache(dataset: str) -> bool:
    """True if the Hugging Face hub cache or the datasets cache holds anything of ``dataset``."""
    from huggingface_hub import constants

    repo = dataset.split(" (config")[0]
    candidates = [Path(constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}"]
    try:
        import datasets.config

        candidates.append(Path(datasets.config.HF_DATASETS_CACHE) / repo.replace("/", "___"))
    except ImportError:
        pass
    return any(p.is_dir() and any(p.iterdir()) for p in candidates)


def check_task_data(tasks: list[str]) -> None:
    """Raise `TaskDataUnavailable`, naming every missing dataset, if a task's data are neither in the
    local Hugging Face cache nor downloadable now. Cheap: run it before calibrating or evaluating."""
    needs = task_datasets(tasks)
    missing = {task: ids for task, ids in needs.items() if not all(_in_local_cache(d) for d in ids)}
    if not missing:
        return
    reason = hub_unreachable_reason()
    if reason is None:
        return
    from huggingface_hub import constants

    listed = "; ".join(f"{task} needs {', '.join(ids)}" for task, ids in missing.items())
    raise TaskDataUnavailable(
        f"task data not available: {listed}. Not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
        f"and the Hub is unreachable ({reason}). Run once with Hub access to cache them, or use the "
        f"offline tasks: {', '.join(available_tasks())}"
    )


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
    task does not report is NaN; ``n`` is the number of examples scored); for a sparse model also
    ``dense_scored`` (fraction of the task's scored tokens predicted by a dense position) and
    ``sparsity`` (the FFN sparsity measured over every request of the call).
    """
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of examples or None, got {limit}")
    lm_eval = _require_lm_eval()
    tasks = expand_tasks(list(tasks))

    local = set(available_tasks())
    others = [t for t in tasks if t not in local | _local_tags()]
    # The countdown_ prefix is ours: such a name that is not shipped is a typo, no need to ask lm-eval.
    _check_known([t for t in others if t.startswith(LOCAL_PREFIX)], local)
    # lm-eval's own registry is only indexed when a non-countdown task is asked for.
    manager = _task_manager(bool(others))
    _check_known([t for t in others if t not in manager.all_tasks], local)
    if others:
        check_task_data(others)

    if device is not None:
        model.to(device)
    was_training = bool(getattr(model, "training", False))
    model.eval()  # restored below: dropout off while scoring
    from .lm_eval_model import CountdownLM

    lm = CountdownLM(model, tokenizer=tokenizer, batch_size=batch_size)
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
    sparse = lm.is_sparse()
    measured = lm.sparsity_report().get("measured", {}).get("sparsity") if sparse else None
    results: dict[str, dict[str, float]] = {}
    for name, res in out["results"].items():
        if "acc,none" in res:
            r = {"acc": _float(res.get("acc,none")), "acc_stderr": _float(res.get("acc_stderr,none")),
                 "acc_norm": _float(res.get("acc_norm,none")),
                 "acc_norm_stderr": _float(res.get("acc_norm_stderr,none"))}
        elif any(k.startswith("exact_match,") for k in res):  # generative (gsm8k): strict and flexible answer match
            r = {"exact_match": _float(res.get("exact_match,strict-match")),
                 "exact_match_stderr": _float(res.get("exact_match_stderr,strict-match")),
                 "exact_match_flexible": _float(res.get("exact_match,flexible-extract")),
                 "exact_match_flexible_stderr": _float(res.get("exact_match_stderr,flexible-extract"))}
        else:
            continue
        r["n"] = float(n_samples.get(name, {}).get("effective", math.nan))
        scored, dense = lm.scored_tokens.get(name, (0, 0))
        if sparse and scored:
            r["dense_scored"] = dense / scored
        if measured is not None:
            r["sparsity"] = measured  # FFN sparsity measured over every task of this call
        results[name] = r
    return results
