"""Held out means held out (issue 21): no evaluation or validation prompt of any task occurs in its training split.

Every registered task is built at every shipped config that selects it (each ``conf/data/*.yaml``, and the data node
of each ``conf/experiment/*.yaml`` as ``opd-train experiment=<name>`` composes it) and its splits must share no
prompt (:func:`opd.data.base.split_overlap` all 0), the validation split carved from train included. Hub datasets
cannot load offline and the repository ships no copy of them: those configs are skipped with the reason, and the
same code paths are checked on local fixtures below (instruct and math read local JSON-lines; GSM8K's loader is
replaced). A config whose problem space is too small for its splits must stop with one line.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from opd.data.base import Example, Task, split_overlap, validation_split
from opd.data.generated import held_out_splits
from opd.data.multiplication import Multiplication
from opd.errors import DataError
from opd.registry import DATASETS
from opd.train import CONF_DIR, build_trainer, run

CONF = Path(CONF_DIR)
#: every shipped config that selects a task: ("data", stem) for conf/data/<stem>.yaml, ("experiment", name) for one run
SHIPPED = [("data", p.stem) for p in sorted((CONF / "data").glob("*.yaml"))] + \
          [("experiment", p.relative_to(CONF / "experiment").with_suffix("").as_posix())
           for p in sorted((CONF / "experiment").rglob("*.yaml"))]
#: tasks whose every shipped config needs a hub download; their splitting is checked on local fixtures here
FIXTURE_TESTED = {"gsm8k", "instruct", "math", "jsonl"}
ZERO = {"train_eval": 0, "train_validation": 0, "eval_validation": 0}
_built: dict[str, Task | BaseException] = {}  # one build per distinct data node (many experiments share one)


def compose_data(kind: str, name: str, jsonl_dir: Path):
    """The ``data`` node and ``trainer.validation_examples`` of one shipped config."""
    overrides = [f"{kind}={name}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    data = cfg.data
    if data.name == "jsonl" and OmegaConf.is_missing(data, "train_path"):  # the entry has no default file: give one
        data.train_path = str(jsonl_dir / "train.jsonl")
    return data, cfg.trainer.validation_examples


def build_once(node) -> Task:
    """``DATASETS.build(node)``, cached by the node's YAML (errors too, so each is raised once per distinct node)."""
    key = OmegaConf.to_yaml(node)
    if key not in _built:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # dropped repeats warn; the overlap check below is what matters
                _built[key] = DATASETS.build(node, "data")
        except (DataError, ValueError) as err:
            _built[key] = err
    if isinstance(_built[key], BaseException):
        raise _built[key]
    return _built[key]


@pytest.fixture(scope="module")
def jsonl_dir(tmp_path_factory) -> Path:
    """A train file whose last rows (num_holdout) repeat training prompts: they must not stay in training."""
    directory = tmp_path_factory.mktemp("jsonl")
    rows = [{"prompt": f"{i}+1=", "answer": i + 1} for i in range(150)] + [{"prompt": "3+1=", "answer": 4}]
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def test_every_registered_task_is_checked():
    selected = {OmegaConf.load(p).name for p in (CONF / "data").glob("*.yaml")}  # experiments pick among these
    assert set(DATASETS) <= selected | FIXTURE_TESTED


@pytest.mark.parametrize(("kind", "name"), SHIPPED, ids=[f"{k}/{n}" for k, n in SHIPPED])
def test_shipped_config_splits_are_disjoint(kind, name, jsonl_dir):
    data, validation_examples = compose_data(kind, name, jsonl_dir)
    try:
        task = build_once(data)
    except DataError as err:
        if "could not load dataset" in str(err):
            pytest.skip(f"{kind}/{name} needs a Hugging Face hub dataset (offline, no copy in the repository): {err}")
        raise
    assert split_overlap(task) == ZERO
    for split in (task.eval, task.validation or []):
        assert len({ex.prompt for ex in split}) == len(split), "a held-out split repeats a prompt"
    if not task.validation:  # what a method that reads a validation split carves out of train
        carved = copy.copy(task)
        carved.train = list(task.train)
        size = min(validation_examples, len({ex.prompt for ex in task.train}) // 2)  # the jsonl fixture is small
        validation = validation_split(carved, size)
        assert split_overlap(carved, validation) == ZERO and len(validation) == size


def test_generated_tasks_fill_their_held_out_splits():
    task = Multiplication(num_train=6000, num_eval=400, num_validation=100)  # 8100 problems, ~4200 in training
    assert (len(task.eval), len(task.validation)) == (400, 100)  # the old rule silently left ~200 of the 400
    assert split_overlap(task) == ZERO
    assert task.train == Multiplication(num_train=6000, num_eval=7).train  # train never moves
    assert task.eval[:7] == Multiplication(num_train=6000, num_eval=7).eval  # a longer eval extends a shorter one


def test_generated_splits_are_remembered_but_each_task_owns_its_lists():
    """The splits of a generated task are computed once per process and settings (an in-process sweep builds many
    trainers of one task): a second task gets equal splits from the cache, in lists of its own, and an error is raised
    again rather than cached."""
    from opd.data.generated import _cached_splits

    first = Multiplication(num_train=50, num_eval=5, seed=11)
    before = _cached_splits.cache_info()
    second = Multiplication(num_train=50, num_eval=5, seed=11)
    after = _cached_splits.cache_info()
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)  # the second task came from the cache
    assert second.train == first.train and second.eval == first.eval
    second.train.pop()
    assert len(Multiplication(num_train=50, num_eval=5, seed=11).train) == 50  # a caller's edit does not reach it
    assert Multiplication(num_train=50, num_eval=5, seed=12).train != first.train  # the seed is part of the key
    for _ in range(2):
        with pytest.raises(DataError):
            Multiplication(num_train=2000, num_eval=64, min_digits=1, max_digits=1)


def test_a_gym_task_holds_out_its_own_validation_split_after_eval():
    """``data.num_validation`` (tuning runs) takes the next distinct problems after eval: train and eval do not move,
    so runs with and without a validation split train and report on the same problems."""
    node = {"name": "gym", "dataset": "chain_sum", "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1,
                                                                "max_digits": 2}, "num_train": 300, "num_eval": 20}
    plain = DATASETS.build(node, "data")
    tuned = DATASETS.build({**node, "num_validation": 30}, "data")
    assert plain.validation is None and len(tuned.validation) == 30
    assert (tuned.train, tuned.eval) == (plain.train, plain.eval)
    assert split_overlap(tuned) == ZERO
    assert validation_split(tuned, 25) == tuned.validation[:25]  # its own split: nothing carved from train
    assert tuned.is_correct(f"The sum is {tuned.validation[0].target}.", tuned.validation[0])  # entries known


def test_one_digit_products_with_2000_training_problems_stop_with_one_line():
    node = {"name": "gym", "dataset": "products", "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1,
                                                               "max_digits": 1}, "num_train": 2000, "num_eval": 64}
    with pytest.raises(DataError) as info:
        DATASETS.build(node, "data")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("data: gym (reasoning_gym 'products' {min_terms: 2, max_terms: 2, min_digits: 1, "
                              "max_digits: 1}, seed 0) yields 100 distinct problems")
    assert "num_train=2000 covers 100 of them, leaving 0 unseen for num_eval=64 held-out problems" in message
    assert message.endswith("lower num_train/num_eval or choose a harder config")


def test_held_out_splits_skip_repeats_and_refuse_a_small_space():
    def problem(i: int) -> Example:  # 7 distinct problems, repeating
        return Example(f"p{i % 7}", "", "")

    train, evaluation, validation = held_out_splits(problem, 3, 2, 2, "data: toy")
    assert [e.prompt for e in train] == ["p0", "p1", "p2"]
    assert [e.prompt for e in evaluation] == ["p3", "p4"] and [e.prompt for e in validation] == ["p5", "p6"]
    with pytest.raises(DataError, match=r"^data: toy yields 7 distinct problems in its first \d+; num_train=3 covers 3 "
                                        r"of them, leaving 4 unseen for num_eval=2 \+ num_validation=3 held-out"):
        held_out_splits(problem, 3, 2, 3, "data: toy")


def test_carved_validation_takes_every_repeat_of_its_prompts_out_of_train():
    class Listed(Task):
        def __init__(self, train, eval_):
            self.train, self.eval, self.validation = train, eval_, None

    train = [Example(f"a{i % 5}=", "", "") for i in range(40)]  # 5 prompts, 8 copies each
    task = Listed(list(train), [Example("b=", "", "")])
    validation = validation_split(task, 2)
    assert len(validation) == 2 and len(task.train) == 24  # 2 prompts x 8 copies moved out
    assert split_overlap(task, validation) == ZERO


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_instruct_drops_training_and_dev_rows_that_repeat_an_eval_prompt(tmp_path):
    rows = [{"instruction": f"say {i}", "input": "", "output": f"{i}"} for i in range(12)]
    train = _write(tmp_path / "raw.jsonl", rows + [rows[1], rows[7]])  # row 1 (dev) and row 7 (train) repeat
    evals = _write(tmp_path / "valid.jsonl", [rows[0], rows[7]])  # eval repeats a dev row and a training row
    with pytest.warns(UserWarning, match="dropped"):
        task = DATASETS.build({"name": "instruct", "train_path": str(train), "train_file": None, "dev_num": 3,
                               "eval_path": str(evals), "eval_file": None}, "data")
    assert len(task.eval) == 2 and split_overlap(task) == ZERO  # the evaluation set stays whole
    assert len(task.validation) == 2 and len(task.train) == 8  # dev rows 1, 2; train rows 3-6, 8-11 (7 and repeats out)


def test_math_and_gsm8k_drop_training_problems_that_repeat_an_eval_problem(tmp_path, monkeypatch):
    problems = [{"problem": f"What is {i}?", "solution": f"\\boxed{{{i}}}", "answer": str(i)} for i in range(10)]
    train, evals = _write(tmp_path / "train.jsonl", problems), _write(tmp_path / "test.jsonl", problems[8:])
    with pytest.warns(UserWarning, match="dropped 2 of 10"):
        task = DATASETS.build({"name": "math", "train_path": str(train), "eval_path": str(evals), "num_train": 8}, "data")
    assert len(task.train) == 8 and len(task.eval) == 2 and split_overlap(task) == ZERO

    rows = [{"question": f"q{i}", "answer": f"so #### {i}"} for i in range(6)]
    monkeypatch.setattr("opd.data.hub.load_hub_split", lambda path, config, split: rows if split == "train" else rows[:2])
    with pytest.warns(UserWarning, match="dropped 2 of 6"):
        task = DATASETS.build({"name": "gsm8k"}, "data")
    assert len(task.train) == 4 and len(task.eval) == 2 and split_overlap(task) == ZERO


def test_jsonl_holdout_and_eval_file_stay_whole_and_leave_training(jsonl_dir):
    with pytest.warns(UserWarning, match="dropped 1 of 51"):
        task = DATASETS.build({"name": "jsonl", "train_path": str(jsonl_dir / "train.jsonl"), "num_holdout": 100}, "data")
    assert len(task.eval) == 100 and len(task.train) == 50 and split_overlap(task) == ZERO
    same = str(jsonl_dir / "train.jsonl")
    with pytest.raises(DataError, match="every training row .* repeats a held-out prompt"), pytest.warns(UserWarning):
        DATASETS.build({"name": "jsonl", "train_path": same, "eval_path": same}, "data")


def test_mixture_sources_that_share_prompts_keep_eval_whole():
    # reasoning_gym's entry i of seed s is entry i + 1 of seed s - 1: source b trains on source a's held-out problems
    node = {"name": "mixture", "tasks": {"a": {"name": "arithmetic", "num_train": 300, "num_eval": 20, "seed": 0},
                                         "b": {"name": "arithmetic", "num_train": 300, "num_eval": 20, "seed": 1}}}
    with pytest.warns(UserWarning, match="source 'b' training examples: dropped"):
        mix = DATASETS.build(node, "data")
    assert len(mix.eval) == 40 and split_overlap(mix) == ZERO


def test_run_summary_reports_split_overlap_and_start_up_warns_when_nonzero(compose_cfg, tmp_path, monkeypatch):
    fast = ("method=sft", "trainer.max_steps=1", "trainer.batch_size=4", "trainer.eval_examples=4",
            "sampler.max_new_tokens=8")
    summary = run(compose_cfg("data.num_train=32", "data.num_eval=8", *fast))
    assert summary["split_overlap"] == ZERO
    # a task that leaves its eval prompts in training (as user data could before issue 21): visible at start-up
    monkeypatch.setattr("opd.data.jsonl.without_prompts", lambda examples, held_out, what: list(examples))
    rows = _write(tmp_path / "rows.jsonl", [{"prompt": f"{i}+1=", "answer": i + 1} for i in range(12)])
    with pytest.warns(UserWarning, match=r"data: the splits share prompts \{'train_eval': 12, "):
        trainer = build_trainer(compose_cfg("data=jsonl", f"data.train_path={rows}", f"data.eval_path={rows}",
                                            f"output_dir={tmp_path / 'second'}", *fast))
    assert trainer.split_overlap["train_eval"] == 12
