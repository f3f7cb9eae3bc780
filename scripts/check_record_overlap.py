"""Did the recorded experiments evaluate on problems they trained on? (issue 21, "held-out means held out")

    python scripts/check_record_overlap.py            # markdown table on stdout
    python scripts/check_record_overlap.py --json out.json

For each record under ``experiments/`` this rebuilds the task its runs used, as they used it: the config is composed
with Hydra from the ``conf/`` tree of the commit the record names (``git archive``), with the record's experiment and
overrides, and the splits are cut by the rule the code had then (reimplemented below, since ``opd.data`` now follows
another rule): ``train`` = the first ``num_train`` problems; ``eval`` = the next ``num_eval`` minus prompts seen in
train, or, when every one of them was seen, all of them (the fallback issue 21 removed); ``validation`` = the rest
minus prompts seen in train or eval. It counts the evaluated problems whose prompt is also a training prompt, and how
many of those the runs actually drew for training within their steps (the prompt stream replayed per seed with
``opd.data.base.PromptIterator``, unchanged since the first commit).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import opd.train  # noqa: F401  (registers the config schema Hydra composes against)
from opd.data import arithmetic, multiplication
from opd.data.base import Example, PromptIterator
from opd.data.generated import worked_problems

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Run:
    """One kind of run of a record: where its config lives and what it evaluated on."""

    record: str  # directory under experiments/
    label: str  # the runs, as the record names them
    commit: str  # the commit whose conf/ the runs used (from the record's README)
    overrides: tuple[str, ...]  # the command line's overrides
    seeds: tuple[int, ...]  # the seeds the record ran
    split: str = "eval"  # the split its accuracies are on: eval, or validation for a tuning run


RUNS = [
    Run("2026-11-25_default_demo", "make demo", "f42ec3b", (), (0,)),
    Run("2026-11-25_deepspeed_two_process", "ZeRO-2 / ZeRO-3, 2 processes", "d778c02", (), (0,)),
    Run("2026-11-25_toy_table", "14 methods", "f42ec3b", ("experiment=toy_table",), (0, 1, 2)),
    Run("2026-11-30_async_opd", "toy: max_staleness 0/1/2", "ffdf746", (), (0, 1, 2)),
    Run("2026-11-30_async_opd", "real: max_staleness 0/1/2", "aee2f84", ("experiment=real_smollm2", "method=gkd"),
        (0, 1, 2)),
    Run("2026-11-30_miniature_v2", "tuning (toy_tune)", "b6eef29", ("experiment=toy_tune",), (0,), "validation"),
    Run("2026-11-30_miniature_v2", "table and claims 1-8", "b6eef29", ("experiment=miniature_v2",), (0, 1, 2)),
    Run("2026-11-30_miniature_v2", "claim 8' (real_opsd)", "b6eef29", ("experiment=real_opsd",), (0, 1, 2)),
    Run("2026-11-30_real_smollm2", "sft, seqkd, gkd, tm_opd", "fe74d78", ("experiment=real_smollm2",), (0, 1)),
    Run("2026-11-30_two_teachers", "4 arms", "b4dd58b", ("experiment=two_teachers",), (0, 1, 2)),
]


def compose_at(commit: str, overrides: tuple[str, ...], scratch: Path):
    """The run config composed from ``conf/`` as it was at ``commit`` (extracted once under ``scratch``)."""
    tree = scratch / commit
    if not tree.exists():
        archive = subprocess.run(["git", "archive", commit, "conf"], cwd=ROOT, capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tree, filter="data")
    with initialize_config_dir(config_dir=str(tree / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def old_splits(problems: list[Example], num_train: int, num_eval: int) -> tuple[list[Example], ...]:
    """(train, eval, validation) by the rule before issue 21 (``opd/data/generated.py``, ``opd/data/gym.py``)."""
    train = problems[:num_train]
    seen = {ex.prompt for ex in train}
    window = problems[num_train:num_train + num_eval]
    evaluation = [ex for ex in window if ex.prompt not in seen] or window  # the removed fallback
    seen |= {ex.prompt for ex in evaluation}
    return train, evaluation, [ex for ex in problems[num_train + num_eval:] if ex.prompt not in seen]


def old_task(node: dict[str, Any]) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, eval, validation) of a data node as the code of the records built it."""
    name = node["name"]
    if name == "mixture":
        parts = [old_task(source) for source in node["tasks"].values()]
        cap = node.get("max_train_per_source") or None
        return ([ex for train, _, _ in parts for ex in train[:cap]], [ex for _, ev, _ in parts for ex in ev],
                [ex for _, _, val in parts for ex in val])
    num_train, num_eval, num_validation = node["num_train"], node["num_eval"], node.get("num_validation", 0)
    total = num_train + num_eval + num_validation
    if name in ("arithmetic", "multiplication"):
        module, dataset = (arithmetic, "chain_sum") if name == "arithmetic" else (multiplication, "products")
        problem = worked_problems(dataset, module.worked_solution, total, node["seed"],
                                  **{k: node[k] for k in ("min_terms", "max_terms", "min_digits", "max_digits")})
        return old_splits([problem(i) for i in range(total)], num_train, num_eval)
    if name == "gym":
        import reasoning_gym

        source = reasoning_gym.create_dataset(node["dataset"], size=total, seed=node["seed"], **node["config"])
        instruction = node["instruction"]
        problems = [Example(e["question"].strip() + (f"\n{instruction}" if instruction else ""), str(e["answer"]),
                            str(e["answer"])) for e in source]
        return old_splits(problems, num_train, num_eval)
    raise ValueError(f"no old split rule for data.name={name!r}")


def drawn_prompts(train: list[Example], cfg, seed: int) -> set[str]:
    """The prompts a run with ``seed`` drew for training: ``max_steps x grad_accum`` batches of its prompt stream."""
    stream = PromptIterator(train, cfg.trainer.batch_size, seed)
    return {ex.prompt for _ in range(cfg.trainer.max_steps * cfg.trainer.grad_accum) for ex in next(stream)}


def check(run: Run, scratch: Path) -> dict[str, Any]:
    """One table row: the evaluated problems, how many are training prompts, and how many of those were drawn."""
    cfg = compose_at(run.commit, run.overrides, scratch)
    node = OmegaConf.to_container(cfg.data, resolve=True)
    train, evaluation, validation = old_task(node)
    if run.split == "validation":  # a tuning run: accuracies on the task's own validation split, cut to N
        evaluation = validation[: cfg.trainer.validation_examples]
    if cfg.trainer.get("eval_examples"):
        evaluation = evaluation[: cfg.trainer.eval_examples]
    train_prompts = {ex.prompt for ex in train}
    seen = [ex for ex in evaluation if ex.prompt in train_prompts]
    seen_distinct = {ex.prompt for ex in seen}
    drawn = [len(seen_distinct & drawn_prompts(train, cfg, seed)) for seed in run.seeds]
    task = node["name"] if node["name"] != "mixture" else "mixture(" + ", ".join(node["tasks"]) + ")"
    if node["name"] == "gym":
        task = f"gym {node['dataset']} (" + ", ".join(f"{k}={v}" for k, v in node["config"].items()) + ")"
    return {"record": run.record, "runs": run.label, "commit": run.commit, "overrides": list(run.overrides),
            "task": task, "num_train": len(train), "split": run.split, "evaluated": len(evaluation),
            "distinct_evaluated": len({ex.prompt for ex in evaluation}), "seen_in_training": len(seen),
            "distinct_seen_in_training": len(seen_distinct), "share": len(seen) / len(evaluation),
            "distinct_drawn_by_seed": dict(zip(run.seeds, drawn))}


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (counts as problems, then distinct prompts in parentheses)."""
    lines = ["| record | runs (commit) | task | evaluated on: problems (distinct) | of them in the training split "
             "(distinct) | share | distinct ones drawn for training within the run, per seed |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        drawn = ", ".join(f"{n}" for n in r["distinct_drawn_by_seed"].values())
        lines.append(f"| {r['record']} | {r['runs']} (`{r['commit']}`) | {r['task']} | {r['split']}: {r['evaluated']} "
                     f"({r['distinct_evaluated']}) | {r['seen_in_training']} ({r['distinct_seen_in_training']}) | "
                     f"{100 * r['share']:.0f} % | {drawn} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="record_conf_") as scratch:
        rows = [check(run, Path(scratch)) for run in RUNS]
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
