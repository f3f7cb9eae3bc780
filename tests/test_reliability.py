"""Reliability: non-finite steps are skipped and stop the run; bad inputs fail early, clearly, and destroy nothing."""

from __future__ import annotations

import json
import math
import os
import shutil
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import load_file

from opd.engine.checkpoint import COMPLETE_MARKER, list_checkpoints
from opd.errors import ConfigError, DataError, ModelLoadError, TrainingError
from opd.methods.base import LossOutput
from opd.models.toy import build_char_tokenizer, tiny_llama_config
from opd.train import build_trainer, run

COMPOSITION_ERRORS = (HydraException, OmegaConfBaseException)  # Hydra refuses the overrides themselves


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and directory (None) under ``root``, by relative path."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def weights(model: torch.nn.Module) -> torch.Tensor:
    """All parameters of ``model`` as one flat copy."""
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def metric_rows(run_dir: Path) -> dict[int, dict]:
    """Training rows of ``metrics.jsonl`` by step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if "train/loss" in row}


# ---------------------------------------------------------------------------------------- numerical faults
SKIP_CFG = ("method=sft", "data.num_train=16", "data.num_eval=8", "trainer.batch_size=2", "trainer.warmup_steps=0",
            "trainer.lr_schedule=constant", "trainer.max_skipped_steps=2")


@pytest.mark.parametrize("student", [(), ("student.lora.r=4",)], ids=["full", "lora"])
def test_nan_losses_skip_the_update_then_stop_the_run_and_keep_the_last_checkpoint(compose_cfg, tmp_path, monkeypatch,
                                                                                    student):
    run(compose_cfg(*SKIP_CFG, *student, "trainer.max_steps=2"))  # the earlier, good part of the run: checkpoint at step 2
    run_dir = tmp_path / "run"
    good = {name: data for name, data in tree(run_dir).items()
            if name.startswith("checkpoints") or name == "summary.json"}

    trainer = build_trainer(compose_cfg(*SKIP_CFG, *student, "trainer.max_steps=10", "trainer.resume=auto"))
    assert trainer.step == 2
    nan_steps = {3, 5, 6, 7}  # 3 alone, then 5, 6, 7 in a row: the third in a row exceeds max_skipped_steps=2
    real_loss = trainer.method.loss

    def loss(*args, **kwargs) -> LossOutput:
        out = real_loss(*args, **kwargs)
        return LossOutput(out.loss * float("nan"), out.metrics) if trainer.step + 1 in nan_steps else out

    after_step = {2: weights(trainer.student)}
    real_log = trainer.logger.log

    def log(metrics, step):
        real_log(metrics, step)
        after_step[step] = weights(trainer.student)

    monkeypatch.setattr(trainer.method, "loss", loss)
    monkeypatch.setattr(trainer.logger, "log", log)
    with pytest.raises(TrainingError) as info:
        trainer.fit()
    message = str(info.value)
    assert message.startswith("3 optimizer steps in a row had a non-finite loss or gradient")
    assert "at step 7" in message and "trainer.max_skipped_steps=2" in message

    assert torch.equal(after_step[3], after_step[2])  # skipped: weights unchanged
    assert not torch.equal(after_step[4], after_step[3])  # a finite step updates
    assert all(torch.equal(after_step[s], after_step[4]) for s in (5, 6, 7))
    rows = metric_rows(run_dir)
    assert {s: rows[s]["train/skipped_steps"] for s in range(3, 8)} == {3: 1, 4: 1, 5: 2, 6: 3, 7: 4}
    assert rows[3]["train/loss"] == "nan" and math.isfinite(rows[4]["train/loss"])
    # nothing was written over the last good checkpoint, and the earlier summary is untouched
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_000002"]
    assert {name: data for name, data in tree(run_dir).items()
            if name.startswith("checkpoints") or name == "summary.json"} == good


def test_an_infinite_gradient_with_a_finite_loss_is_skipped(compose_cfg):
    trainer = build_trainer(compose_cfg(*SKIP_CFG, "trainer.max_skipped_steps=1"))
    param = next(trainer.student.parameters())
    before = weights(trainer.student)
    hook = param.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    metrics = trainer.train_step()
    hook.remove()
    assert math.isfinite(metrics["train/loss"]) and metrics["train/grad_norm"] == float("inf")
    assert metrics["train/skipped_steps"] == 1 and torch.equal(weights(trainer.student), before)
    assert not trainer.backend.optimizer.state  # no AdamW moment was touched either
    metrics = trainer.train_step()
    assert metrics["train/skipped_steps"] == 1 and trainer.skipped_in_a_row == 0
    assert not torch.equal(weights(trainer.student), before)


def test_zero_max_skipped_steps_stops_at_the_first_bad_step_and_nan_weights_are_never_saved(compose_cfg, tmp_path):
    trainer = build_trainer(compose_cfg(*SKIP_CFG, "trainer.max_skipped_steps=0"))
    hook = next(trainer.student.parameters()).register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(TrainingError, match=r"^1 optimizer steps in a row .* at step 1 "):
        trainer.train_step()
    hook.remove()
    with torch.no_grad():
        next(trainer.student.parameters())[0, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"weight 'model.embed_tokens.weight' is not finite at step 1; refusing"):
        trainer.save()
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_model_dirs) -> Path:
    """A directory of broken inputs, shared by every case (cases only read it; each test checks that)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    student = tiny_model_dirs["student"]

    def model_copy(name: str, drop: tuple[str, ...] = ()) -> Path:
        target = root / name
        shutil.copytree(student, target, ignore=shutil.ignore_patterns(*drop))
        return target

    (model_copy("corrupt_config") / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    (model_copy("list_config") / "config.json").write_text("[1, 2, 3]")
    model_copy("no_config", drop=("config.json",))
    (model_copy("corrupt_weights") / "model.safetensors").write_bytes(b"\x00" * 64)
    model_copy("no_tokenizer", drop=("tokenizer*", "special_tokens_map.json"))
    pickled = model_copy("pickle_weights", drop=("*.safetensors",))  # pickle weights only: refused
    torch.save(load_file(str(student / "model.safetensors")), pickled / "pytorch_model.bin")

    other = build_char_tokenizer(alphabet="0123456789+-=;#abc")  # another vocabulary
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(tiny_llama_config(other, 32, 1, 4)).save_pretrained(root / "other_vocab")
    other.save_pretrained(root / "other_vocab")

    (root / "empty.jsonl").write_text("")
    (root / "garbage.jsonl").write_text('not json\n{"prompt": "1+1="}\n{"prompt": "", "answer": "2"}\n')
    long_prompt = "1+" * 60 + "1="  # 122 characters: with 24 new tokens more than the tiny models' 128 positions
    (root / "long.jsonl").write_text("\n".join(json.dumps({"prompt": long_prompt, "answer": "61"}) for _ in range(3)))
    # held-out rows must differ from training ones (a training row that repeats an eval prompt is dropped)
    (root / "long_eval.jsonl").write_text(json.dumps({"prompt": "2+" + long_prompt, "answer": "63"}))
    (root / "a_file").write_text("an earlier run's output_dir was never a file\n")

    garbled = root / "garbled_run" / "checkpoints" / "step_000002"  # complete marker, unreadable state
    garbled.mkdir(parents=True)
    (garbled / "trainer_state.pt").write_bytes(b"not a torch file")
    (garbled / COMPLETE_MARKER).write_text("2")
    foreign = root / "foreign_run" / "checkpoints" / "step_000001"  # a readable checkpoint of another model
    shutil.copytree(tiny_model_dirs["teacher"], foreign)
    torch.save({"step": 1}, foreign / "trainer_state.pt")
    (foreign / COMPLETE_MARKER).write_text("1")
    return root


# (id, overrides, expected error type(s), text the message must contain). In overrides and text, $earlier is the
# earlier run's directory, $out the new run's output_dir (a sibling of $earlier), $bad the broken inputs above,
# $student the tiny student (for cases that drop the teacher, whose path compose_cfg would otherwise set).
BAD_INPUTS = [
    # config values Hydra refuses while composing (typed schema)
    ("ill-typed trainer value", ["trainer.lr=abc"], COMPOSITION_ERRORS, "trainer.lr"),
    ("misspelled trainer key", ["trainer.lrr=1"], COMPOSITION_ERRORS, "trainer.lrr"),
    ("unknown method", ["method=nope"], COMPOSITION_ERRORS, "method/nope"),
    ("ill-typed logger value", ["logger.num_completions=many"], COMPOSITION_ERRORS, "logger.num_completions"),
    # fixed sections, range-checked
    ("zero batch size", ["trainer.batch_size=0"], ConfigError, "trainer.batch_size must be >= 1"),
    ("negative max_skipped_steps", ["trainer.max_skipped_steps=-1"], ConfigError, "trainer.max_skipped_steps"),
    ("unknown lr schedule", ["trainer.lr_schedule=step"], ConfigError, "trainer.lr_schedule"),
    ("unknown dtype", ["student.dtype=float8"], ConfigError, "dtype must be"),
    ("unknown logger", ["logger.name=tensorboard"], ConfigError, "logger.name"),
    # method, sampler and data nodes, checked against the chosen class
    ("misspelled method key", ["+method.betta=0.1"], ConfigError, "method.betta"),
    ("ill-typed method value", ["method.beta=high"], ConfigError, "method.beta"),
    ("method value out of range", ["method.beta=2.0"], ConfigError, "beta must be in [0, 1]"),
    ("max_new_tokens <= 0", ["sampler.max_new_tokens=0"], ConfigError, "max_new_tokens must be > 0"),
    ("zero temperature", ["sampler.temperature=0"], ConfigError, "temperature must be > 0"),
    ("unknown data key", ["+data.bogus=1"], ConfigError, "data.bogus"),
    ("empty arithmetic split", ["data.num_train=0"], ConfigError, "num_train and num_eval must be positive"),
    ("privileged template without placeholder", ["method=opsd", "method.template='{prompt} only'"], ConfigError,
     "template must contain the placeholder {solution}"),
    # local dataset files and rows
    ("jsonl without train_path", ["data=jsonl"], ConfigError, "data.train_path"),
    ("missing jsonl file", ["data=jsonl", "data.train_path=$bad/none.jsonl"], DataError,
     "no file at '$bad/none.jsonl'"),
    ("jsonl path is a directory", ["data=jsonl", "data.train_path=$bad"], DataError, "cannot read '$bad'"),
    ("empty jsonl file", ["data=jsonl", "data.train_path=$bad/empty.jsonl"], DataError,
     "'$bad/empty.jsonl' has no valid row (the file is empty)"),
    ("only malformed rows", ["data=jsonl", "data.train_path=$bad/garbage.jsonl"], DataError,
     "'$bad/garbage.jsonl' has no valid row (3 malformed: line 1: not valid JSON"),
    ("answer_pattern without a group", ["data=jsonl", "data.train_path=$bad/garbage.jsonl", "data.answer_pattern=x"],
     ConfigError, "answer_pattern 'x' needs a capturing group"),
    # prompts longer than the context
    ("no prompt fits the context", ["sampler.max_new_tokens=127"], DataError,
     "context of 128 tokens (max_position_embeddings) minus sampler.max_new_tokens=127 leaves 1"),
    ("every jsonl prompt too long", ["data=jsonl", "data.train_path=$bad/long.jsonl", "data.eval_path=$bad/long_eval.jsonl"],
     DataError, "no training prompt fits: the student and teacher's context of 128 tokens"),
    # model directories
    ("missing model directory", ["teacher.name_or_path=$bad/nowhere"], ModelLoadError,
     "teacher.name_or_path: no model directory at '$bad/nowhere'"),
    ("directory without config.json", ["student.name_or_path=$bad/no_config"], ModelLoadError,
     "student.name_or_path: '$bad/no_config' has no config.json"),
    ("corrupt config.json", ["student.name_or_path=$bad/corrupt_config"], ModelLoadError,
     "student.name_or_path: '$bad/corrupt_config/config.json' is not a readable JSON model config"),
    ("config.json not an object", ["teacher.name_or_path=$bad/list_config"], ModelLoadError, "holds a JSON list"),
    ("corrupt weights", ["student.name_or_path=$bad/corrupt_weights"], ModelLoadError,
     "student: could not load '$bad/corrupt_weights'"),
    ("no tokenizer files", ["student.name_or_path=$bad/no_tokenizer"], ModelLoadError,
     "student: could not load '$bad/no_tokenizer'"),
    ("pickle weights with use_safetensors", ["student.name_or_path=$bad/pickle_weights", "student.use_safetensors=true"],
     ModelLoadError, "student: could not load '$bad/pickle_weights': Error no file named model.safetensors"),
    ("teacher and student vocabularies differ", ["teacher.name_or_path=$bad/other_vocab"], ConfigError,
     "tokenizer differs from the student's and method 'gkd' needs one shared vocabulary; distil across tokenizers "
     "with a cross-tokenizer method: alm, uld"),
    ("method needs a teacher but none is set", ["~teacher", "student.name_or_path=$student"], TrainingError,
     "needs a teacher model, but teacher is null"),
    # run directories and resuming
    ("fresh run into a finished run's directory", ["output_dir=$earlier"], ConfigError,
     ("output_dir: '$earlier' already holds a run (summary.json); a fresh run there would overwrite its results. "
      "Continue it with trainer.resume=auto")),
    ("output_dir is a file", ["output_dir=$bad/a_file"], ConfigError, "'$bad/a_file' is a file"),
    ("resume from a missing path", ["trainer.resume=$bad/nowhere"], ConfigError,
     "trainer.resume: no run directory or checkpoint at '$bad/nowhere'"),
    ("resume from a run without checkpoints", ["trainer.resume=$earlier"], ConfigError,
     "trainer.resume: '$earlier' has no complete, readable checkpoint"),
    ("resume=auto in a finished run without checkpoints", ["output_dir=$earlier", "trainer.resume=auto"], ConfigError,
     "trainer.resume=auto: '$earlier' holds a run (summary.json) but no complete, readable checkpoint"),
    ("resume from an unreadable checkpoint", ["trainer.resume=$bad/garbled_run/checkpoints/step_000002"], ConfigError,
     "trainer.resume: checkpoint '$bad/garbled_run/checkpoints/step_000002' cannot be restored"),
    ("resume from another model's checkpoint", ["trainer.resume=$bad/foreign_run"], ConfigError,
     "trainer.resume: checkpoint '$bad/foreign_run/checkpoints/step_000001' cannot be restored"),
]


@pytest.mark.parametrize(("overrides", "errors", "needle"), [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_fails_early_with_a_clear_message_and_keeps_earlier_results(compose_cfg, tiny_model_dirs, tmp_path,
                                                                                bad, overrides, errors, needle):
    runs = tmp_path / "runs"
    earlier = runs / "earlier"  # a finished earlier run
    earlier.mkdir(parents=True)
    (earlier / "summary.json").write_text(json.dumps({"method": "gkd", "steps": 100, "student_accuracy_after": 0.5}))
    (earlier / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.5}\n{"step": 2, "train/loss": 2.25}\n')
    places = {"earlier": str(earlier), "out": str(runs / "new"), "bad": str(bad),
              "student": str(tiny_model_dirs["student"])}
    overrides = [string.Template(o).substitute(places) for o in overrides]
    sizes = [] if any(o.startswith("data=") for o in overrides) else ["data.num_train=64", "data.num_eval=16"]
    before_runs, before_bad = tree(runs), tree(bad)

    with pytest.raises(errors) as info:
        build_trainer(compose_cfg(*sizes, f"output_dir={runs / 'new'}", *overrides,
                                  tiny_models="~teacher" not in overrides))

    message = f"{info.value} {info.value.__cause__ or ''}"  # Hydra puts the offending key in the cause
    assert string.Template(needle).substitute(places) in message
    if isinstance(info.value, ConfigError | ModelLoadError | DataError | TrainingError):
        assert "\n" not in str(info.value)  # one line for the command line
    assert tree(runs) == before_runs, "files of the earlier run changed, or the failed run wrote something"
    assert tree(bad) == before_bad


def test_prompts_too_long_for_the_context_are_skipped_with_a_count(compose_cfg, tmp_path):
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)]
    rows.append({"prompt": "1+" * 60 + "1=", "answer": "61"})  # 123 tokens with BOS
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows))
    # the same kinds of prompts, none of them a training one (training rows repeating an eval prompt are dropped)
    held_out.write_text("\n".join(json.dumps({"prompt": "0+" + r["prompt"], "answer": r["answer"]}) for r in rows))
    with pytest.warns(UserWarning) as caught:
        trainer = build_trainer(compose_cfg("data=jsonl", f"data.train_path={train}", f"data.eval_path={held_out}"))
    assert [str(w.message) for w in caught] == [  # the held-out prompts are two characters longer ("0+")
        f"skipping 1 of 9 {split} prompts that do not fit: the student and teacher's context of 128 tokens "
        "(max_position_embeddings) minus sampler.max_new_tokens=24 leaves 104 tokens for a prompt; the longest prompt "
        f"has {length} tokens" for split, length in (("training", 123), ("evaluation", 125))]
    assert len(trainer.prompts.examples) == 8 and len(trainer.eval_examples) == 8


def test_the_command_line_refuses_to_overwrite_a_finished_run(tiny_model_dirs, tmp_path):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "summary.json").write_text('{"steps": 100}\n')
    (earlier / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.5}\n')
    before = tree(earlier)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "opd.train", "debug=tiny", f"output_dir={earlier}",
                          f"teacher.name_or_path={tiny_model_dirs['teacher']}",
                          f"student.name_or_path={tiny_model_dirs['student']}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(f"opd-train: error: output_dir: '{earlier}' already holds")
    assert "trainer.resume=auto" in out.stderr and "Traceback" not in out.stderr
    assert tree(earlier) == before


def test_loading_is_safe_by_default():
    """Every torch.load in the package is weights_only=True; hub code and pickle weights need an explicit opt-in."""
    from opd.config import ModelConfig
    from opd.train import CONF_DIR

    package = Path(__file__).resolve().parent.parent / "opd"
    calls = [line.strip() for file in package.rglob("*.py") for line in file.read_text().splitlines()
             if "torch.load(" in line]
    assert calls and all("weights_only=True" in call for call in calls), calls
    assert ModelConfig(name_or_path="x").trust_remote_code is False
    for file in [*Path(CONF_DIR, "teacher").glob("*.yaml"), *Path(CONF_DIR, "student").glob("*.yaml")]:
        text = file.read_text()
        if "\nkind: " in text and "\nkind: hf" not in text:  # a teacher that loads no weights (a server, the student's copy)
            continue
        assert "use_safetensors: true" in text and "trust_remote_code: true" not in text, file
