"""Regenerate countdown's offline BIG-bench task files from the PyPI ``bigbench`` 1.0.0 sdist.

Not used at run time.  The sdist (358 MB, Apache-2.0) ships every BIG-bench JSON task under
``bigbench/benchmark_tasks/<task>/task.json``.  pip cannot install it (it declares a
``bleurt @ file://`` dependency), but it can fetch and unpack it:

    pip download --no-deps --no-clean -d /tmp/bb bigbench   # fails at the metadata step,
    ls -d /tmp/pip-download-*/bigbench_*                     # ... leaving the unpacked sdist here

    python countdown/tasks/_build_bigbench.py --src /tmp/pip-download-XXXX/bigbench_YYYY \
        --n 300 hyperbaton social_iqa ...

For each task this reproduces BIG-bench's own zero-shot formatting
(``bigbench.api.json_task.default_format_fn`` with its default seed 42: ``task_prefix`` +
``"\\nQ: "`` + input + ``"\\n  choice: "``-joined permuted choices + ``"\\nA: "``, prefixes
overridable per task) and the field layout of the Hugging Face ``bigbench`` conversion
(``bigbench.bbseqio.bigbench_bridge._parse_for_huggingface``: ``idx``, ``inputs``, ``targets``,
``multiple_choice_targets``, ``multiple_choice_scores``) that lm-eval's
``bigbench_<task>_multiple_choice`` tasks read from the Hub.  Duplicate examples are
dropped as ``JsonTask`` does.  A task with subtasks is the concatenation of its subtasks
(sorted by folder name), each formatted with its own prefixes.  When a task has more than
``--n`` examples, ``--n`` of them are drawn uniformly without replacement
(``numpy.random.RandomState(--seed).choice``); every task's rows are stored in that random order
(a task with at most ``--n`` examples is shipped whole, shuffled), so lm-eval's ``limit=k``, which
takes the first k rows, evaluates a uniform random subset.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

OUT_DIR = Path(__file__).resolve().parent
BB_FORMAT_SEED = 42  # JsonTask(random_seed=42) default


def _format(sample: dict[str, Any], task_data: dict[str, Any], append_choices: bool | None = None) -> dict[str, Any]:
    """BIG-bench's default_format_fn (zero-shot), applied to a copy of ``sample``.

    ``append_choices`` overrides the task's ``append_choices_to_input`` (BIG-bench's own option).
    """
    s = dict(sample)
    input_prefix = task_data.get("example_input_prefix", "\nQ: ")
    output_prefix = task_data.get("example_output_prefix", "\nA: ")
    choice_prefix = task_data.get("choice_prefix", "\n  choice: ")
    if append_choices is None:
        append_choices = task_data.get("append_choices_to_input", True)
    rng = np.random.RandomState(seed=BB_FORMAT_SEED)
    scores = s["target_scores"]
    if append_choices:
        permuted = rng.permutation(sorted(scores.keys()))
        s["input"] = s["input"] + choice_prefix + choice_prefix.join(permuted)
    if "target" not in s:
        best = max(scores.values())
        s["target"] = [k for k, v in scores.items() if v == best][0]
    s["input"] = input_prefix + s["input"] + output_prefix
    if not isinstance(s["target"], list):
        s["target"] = [s["target"]]
    return s


def _leaf_tasks(task_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    top = task_dir / "task.json"
    data = json.loads(top.read_text())
    if data.get("examples"):
        return [(top, data)]
    subs = sorted(glob.glob(str(task_dir / "*" / "task.json")))
    return [(Path(p), json.loads(Path(p).read_text())) for p in subs]


def build_task(src: Path, name: str, n: int, seed: int, cloze: bool = True) -> dict[str, Any]:
    task_dir = src / "bigbench" / "benchmark_tasks" / name
    rows: list[dict[str, Any]] = []
    sources = []
    dropped = 0
    canary = None
    for path, data in _leaf_tasks(task_dir):
        canary = canary or data.get("canary")
        sources.append(
            {
                "file": str(path.relative_to(src)),
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            }
        )
        seen: set[str] = set()
        prefix = str(data.get("task_prefix", ""))
        for ex in data["examples"]:
            key = json.dumps(ex)
            if key in seen:
                continue
            seen.add(key)
            if "target_scores" not in ex:
                dropped += 1
                continue
            f = _format(ex, data)
            cloze_text = _format(ex, data, append_choices=False)["input"]
            choices = list(ex["target_scores"].keys())
            scores = list(ex["target_scores"].values())
            tgt = f["target"][0]
            if tgt not in choices or ex["target_scores"][tgt] != max(scores):
                dropped += 1
                continue
            rows.append(
                {
                    "idx": len(rows),
                    "inputs": prefix + f["input"],
                    "cloze_inputs": prefix + cloze_text,
                    "targets": f["target"],
                    "multiple_choice_targets": choices,
                    "multiple_choice_scores": scores,
                }
            )
    total = len(rows)
    # min(n, total) examples drawn without replacement, in the order drawn (a random order), so that
    # lm-eval's ``limit=k`` (the first k rows) is itself a uniform random subset.
    keep = np.random.RandomState(seed).choice(total, min(n, total), replace=False).tolist()
    rows = [rows[i] for i in keep]
    chance = float(np.mean([1.0 / len(r["multiple_choice_targets"]) for r in rows]))

    out = OUT_DIR / f"bigbench_{name}"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "test.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out / f"countdown_bigbench_{name}.yaml").write_text(
        f"# BIG-bench `{name}` (multiple choice, zero-shot): {len(rows)} of {total} examples,\n"
        f"# from the PyPI sdist bigbench==1.0.0 (Apache-2.0). See ../README.md.\n"
        f"# {canary}\n"
        "include: ../_bigbench_mc_template_yaml\n"
        f"task: countdown_bigbench_{name}\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: bigbench_{name}/test.jsonl\n"
    )
    if cloze:
        (out / f"countdown_bigbench_{name}_cloze.yaml").write_text(
            f"# BIG-bench `{name}`, cloze form (choices not listed in the prompt; each scored as the\n"
            f"# answer's continuation): same {len(rows)} examples as countdown_bigbench_{name}. See ../README.md.\n"
            f"# {canary}\n"
            "include: ../_bigbench_cloze_template_yaml\n"
            f"task: countdown_bigbench_{name}_cloze\n"
            "dataset_kwargs:\n"
            "  data_files:\n"
            f"    test: bigbench_{name}/test.jsonl\n"
        )
    return {
        "task": f"countdown_bigbench_{name}",
        "variants": [f"countdown_bigbench_{name}"] + ([f"countdown_bigbench_{name}_cloze"] if cloze else []),
        "bigbench_task": name,
        "lm_eval_hub_equivalent": f"bigbench_{name}_multiple_choice",
        "sources": sources,
        "examples_in_source": total,
        "examples_shipped": len(rows),
        "dropped_non_mc": dropped,
        "subset_seed": seed,
        "chance_acc": round(chance, 4),
        "canary": canary,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, type=Path, help="unpacked bigbench-1.0.0 sdist")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("tasks", nargs="+")
    a = ap.parse_args()
    manifest_path = OUT_DIR / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.setdefault("source", {"package": "bigbench", "version": "1.0.0", "index": "PyPI", "licence": "Apache-2.0"})
    manifest.setdefault("tasks", {})
    for t in a.tasks:
        info = build_task(a.src, t, a.n, a.seed)
        manifest["tasks"][info["task"]] = info
        print(f"{info['task']}: {info['examples_shipped']}/{info['examples_in_source']} chance={info['chance_acc']}")
    manifest["tasks"] = dict(sorted(manifest["tasks"].items()))
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    print("total bytes:", sum(os.path.getsize(p) for p in OUT_DIR.glob("bigbench_*/*")))


if __name__ == "__main__":
    main()
