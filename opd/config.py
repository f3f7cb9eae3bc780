"""Typed config schemas, registered in Hydra's ConfigStore.

``conf/train.yaml`` starts from ``train_schema`` (``TrainConfig`` below), so a misspelled key or a
value of the wrong type in any fixed group fails at composition with the key's name. The ``method``,
``sampler`` and ``data`` nodes differ per choice; they are checked against the chosen class's
signature by the registry (``opd.registry.Registry.validate``) before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from opd.errors import ConfigError, unknown_key_error
from opd.registry import TEACHERS

ASSETS = Path(__file__).parent / "assets"


def keep_layer_indices(num_layers: int, keep: Any, key: str = "keep_layers") -> list[int]:
    """The layer indices that ``keep`` selects.

    Args:
        num_layers: the model's decoder layers L.
        keep: N (an int): N layers evenly spaced over ``[0, L−1]``, first and last included
            (``round(i·(L−1)/(N−1))``); or an explicit list of distinct, increasing indices.
        key: the config key, for messages.
    Returns:
        Increasing layer indices.
    Raises:
        ValueError: naming ``key`` when N is not in [1, L] or an index is out of range, repeated or unordered.
    """
    if isinstance(keep, bool):
        raise ValueError(f"{key} must be an int or a list of layer indices, got {keep!r}")
    if isinstance(keep, int):
        if not 1 <= keep <= num_layers:
            raise ValueError(f"{key}={keep}: the model has {num_layers} layers; keep between 1 and {num_layers}")
        if keep == 1:
            return [0]
        return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})
    indices = list(keep)
    if not indices or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ValueError(f"{key} must be an int or a non-empty list of layer indices, got {keep!r}")
    if any(not 0 <= i < num_layers for i in indices) or indices != sorted(set(indices)):
        raise ValueError(f"{key}={indices}: indices must be distinct, increasing and in [0, {num_layers - 1}]")
    return indices


@dataclasses.dataclass
class LoraConfig:
    """LoRA adapters on the student (``student.lora``; opd/models/lora.py, through ``peft``): off while ``r`` is null.

    Defaults follow "LoRA Without Regret" (Schulman et al., Thinking Machines 2025): every linear layer adapted
    (``all-linear``), alpha fixed at 32 whatever the rank, and a learning rate about 10x full fine-tuning's.
    """

    r: Optional[int] = None  # adapter rank; null = full fine-tuning (no adapters) | e.g. 8, 16, 32
    alpha: float = 32.0  # scale alpha / r of the adapter's output (LoRA Without Regret keeps 32 for every rank)
    dropout: float = 0.0  # dropout on the adapter's input; needs trainer.disable_dropout=false to take effect
    target_modules: Any = "all-linear"  # all-linear (every linear layer but the head) | [q_proj, v_proj, ...] | a regex

    def __post_init__(self) -> None:
        if self.r is not None and (isinstance(self.r, bool) or self.r < 1):
            raise ConfigError(f"student.lora.r must be a positive int or null (full fine-tuning), got {self.r!r}")
        if self.alpha <= 0:
            raise ConfigError(f"student.lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"student.lora.dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.target_modules, str) and (
                not list(self.target_modules) or not all(isinstance(t, str) for t in self.target_modules)):
            raise ConfigError("student.lora.target_modules must be all-linear, a regex, or a non-empty list of module "
                              f"names, got {self.target_modules!r}")

    @property
    def enabled(self) -> bool:
        return self.r is not None


@dataclasses.dataclass
class ModelConfig:
    """A causal LM: a local directory or a hub id, loaded with ``AutoModelForCausalLM.from_pretrained``.

    The student's schema, and that of ``teacher.kind: hf`` (``opd/teachers/hf.py``); other teacher kinds have their own.
    """

    name_or_path: str = MISSING  # local directory or hub id
    tokenizer: Optional[str] = None  # tokenizer directory or id; the model's own when null
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto
    revision: Optional[str] = None  # hub revision (branch, tag or commit)
    trust_remote_code: bool = False  # run code shipped with a hub model; off unless you trust it
    use_safetensors: Optional[bool] = None  # True: refuse pickle weights; null: transformers decides
    attn_implementation: Optional[str] = None  # eager | sdpa | flash_attention_2; transformers' default when null
    keep_layers: Any = None  # null = all layers | N = N evenly spaced decoder layers | [i, j, ...] (opd/models/pruning.py)
    chat_template: bool = False  # prompts as one user turn of the tokenizer's chat template; teacher and student must agree
    add_bos_token: Optional[bool] = None  # true: prompts start with BOS (Gemma's GGUF tokenizer omits it) | false | null: as is
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)  # student only: LoRA adapters (r: null = full fine-tuning)
    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):  # from a plain mapping (fixed_sections, a teacher node): typed and checked here
            unknown = sorted(set(self.lora) - {f.name for f in dataclasses.fields(LoraConfig)})
            if unknown:
                raise ConfigError(f"lora: unknown keys {unknown}; valid: {[f.name for f in dataclasses.fields(LoraConfig)]}")
            self.lora = LoraConfig(**self.lora)
        elif self.lora is None:
            self.lora = LoraConfig()
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ConfigError(f"model dtype must be float32, bfloat16, float16 or auto, got {self.dtype!r}")
        if self.keep_layers is not None:
            try:  # the form only; the range is checked against the model's depth when it loads
                keep_layer_indices(10**9, self.keep_layers if isinstance(self.keep_layers, int) else list(self.keep_layers))
            except (TypeError, ValueError) as err:
                raise ConfigError(f"keep_layers: {err}") from None


@dataclasses.dataclass
class TrainerConfig:
    """Optimisation, evaluation and checkpointing of the student."""

    max_steps: int = 100  # optimizer steps
    batch_size: int = 32  # prompts per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    adam_beta1: float = 0.9  # AdamW β1
    adam_beta2: float = 0.999  # AdamW β2
    warmup_steps: int = 10  # linear warmup from 0 to lr
    lr_schedule: str = "cosine"  # after warmup: cosine | linear | constant
    min_lr_ratio: float = 0.1  # final lr as a fraction of lr (cosine and linear)
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    max_skipped_steps: int = 5  # stop after this many non-finite steps in a row
    eval_every: int = 50  # evaluate every N steps (and at the end); 0 = only before and after
    eval_examples: Optional[int] = None  # cap on held-out examples per evaluation; all when null
    eval_batch_size: int = 128  # prompts per greedy evaluation batch
    eval_samples: int = 0  # n sampled completions per held-out prompt for pass@k at each evaluation; 0 = greedy only
    eval_teacher_kl: bool = False  # also log the exact per-token reverse KL to the teacher on student samples of the eval split
    eval_pass_k: list[int] = dataclasses.field(default_factory=lambda: [1])  # the k values of pass@k (each <= eval_samples)
    save_every: int = 0  # checkpoint every N steps (and at the end); 0 = only at the end
    keep_checkpoints: int = 2  # keep the newest N checkpoints
    resume: Optional[str] = None  # null = fresh | auto = this run dir's newest valid checkpoint, if any | a run/checkpoint dir
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    num_threads: Optional[int] = None  # torch CPU threads; null = auto: 1 for tiny models on CPU, else torch's default
    loss_chunk_size: Optional[int] = None  # loss from hidden states, N tokens of logits at a time: null = auto, 0 = off
    share_prompts: bool = True  # rows repeating a prompt (sampler.n > 1): its forward pass once, completions on its cache
    compile: bool = False  # torch.compile(dynamic=True) the student's and teacher's forward (rollouts, scoring, training)
    disable_dropout: bool = True  # dropout off in the student while trained and scored (opd/models/dropout.py)
    validation_examples: int = 500  # validation split for methods that read one: a dev split cut to N, else N carved from train
    evaluate_on: str = "eval"  # eval = the task's held-out split | validation = the validation split (tuning: eval is never read)
    progress: bool = True  # tqdm progress bars
    max_staleness: int = 0  # 0 = synchronous | N = a worker process samples the next N steps' rollouts meanwhile
    rollout_num_threads: Optional[int] = None  # torch CPU threads of that worker; null = 1 on CPU
    overlong: str = "keep"  # sampled completions that hit max_new_tokens without EOS: keep (train on them) | mask (no loss)

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "grad_accum", "eval_batch_size", "keep_checkpoints", "validation_examples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"trainer.{key} must be >= 1, got {getattr(self, key)}")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 0:
            raise ConfigError(f"trainer.loss_chunk_size must be >= 0 or null, got {self.loss_chunk_size}")
        if self.rollout_num_threads is not None and self.rollout_num_threads < 1:
            raise ConfigError(f"trainer.rollout_num_threads must be >= 1 or null, got {self.rollout_num_threads}")
        for key in ("warmup_steps", "eval_every", "save_every", "max_skipped_steps", "max_staleness"):
            if getattr(self, key) < 0:
                raise ConfigError(f"trainer.{key} must be >= 0, got {getattr(self, key)}")
        if self.eval_samples < 0:
            raise ConfigError(f"trainer.eval_samples must be >= 0, got {self.eval_samples}")
        if self.eval_samples and any(not 1 <= k <= self.eval_samples for k in self.eval_pass_k):
            raise ConfigError(f"trainer.eval_pass_k values must be in [1, eval_samples={self.eval_samples}], "
                              f"got {list(self.eval_pass_k)}")
        if self.lr <= 0:
            raise ConfigError(f"trainer.lr must be > 0, got {self.lr}")
        if self.evaluate_on not in ("eval", "validation"):
            raise ConfigError(f"trainer.evaluate_on must be eval or validation, got {self.evaluate_on!r}")
        if self.overlong not in ("keep", "mask"):
            raise ConfigError(f"trainer.overlong must be keep or mask, got {self.overlong!r}")
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"trainer.lr_schedule must be cosine, linear or constant, got {self.lr_schedule!r}")


@dataclasses.dataclass
class LoggerConfig:
    """Where metrics go besides ``metrics.jsonl`` (always written)."""

    name: str = "jsonl"  # jsonl (local file only) | wandb (also Weights & Biases)
    project: str = "opd"  # W&B project
    entity: Optional[str] = None  # W&B entity (team); your default when null
    group: Optional[str] = None  # W&B group; the experiment name when null, so a sweep's runs share one
    mode: Optional[str] = None  # W&B mode: online | offline | disabled; offline when no API key is set
    tags: list[str] = dataclasses.field(default_factory=list)  # W&B tags
    num_completions: int = 8  # sample completions logged per evaluation

    def __post_init__(self) -> None:
        if self.name not in ("jsonl", "wandb"):
            raise ConfigError(f"logger.name must be jsonl or wandb, got {self.name!r}")


@dataclasses.dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO for multi-process runs (``conf/deepspeed/<none|zero2|zero3>.yaml``; opd/engine/backends.py)."""

    enabled: bool = False  # train the student through deepspeed.initialize; needed for more than one process
    stage: int = 2  # ZeRO stage of the student: 0 = plain data parallel, 1 = optimizer states, 2 = + gradients, 3 = + parameters
    teacher_stage: int = 3  # the teacher's inference engine: 3 = parameters sharded over ranks (ZeRO-3), 0 = a full copy per rank
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states (and the update) on the CPU
    offload_param: bool = False  # stage 3 only: student parameters live on the CPU between uses
    teacher_offload_param: bool = False  # teacher_stage 3: teacher parameters live on the CPU between uses
    param_persistence_threshold: int = 100000  # stage 3: parameters with fewer elements stay whole on every rank
    reduce_bucket_size: int = 50000000  # elements per gradient reduce (and stage-3 prefetch) bucket
    overlap_comm: bool = False  # overlap gradient reduction with backward (GPU; more memory)
    torch_adam: bool = True  # torch.optim.AdamW inside DeepSpeed; false = DeepSpeed's fused Adam (GPU builds)
    backend: Optional[str] = None  # process-group backend: nccl | gloo; null = nccl with CUDA, gloo on CPU
    timeout_minutes: float = 30.0  # collective timeout (a rank stuck longer fails the run)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # raw DeepSpeed config entries merged last

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.stage must be 0, 1, 2 or 3, got {self.stage}")
        if self.teacher_stage not in (0, 3):
            raise ConfigError(f"deepspeed.teacher_stage must be 0 (a copy per rank) or 3 (sharded), got {self.teacher_stage}")
        if self.offload_param and self.stage != 3:
            raise ConfigError("deepspeed.offload_param needs deepspeed.stage=3 (only ZeRO-3 partitions parameters)")
        if self.backend not in (None, "nccl", "gloo"):
            raise ConfigError(f"deepspeed.backend must be nccl, gloo or null, got {self.backend!r}")
        if self.param_persistence_threshold < 0 or self.reduce_bucket_size < 1:
            raise ConfigError("deepspeed.param_persistence_threshold must be >= 0 and deepspeed.reduce_bucket_size >= 1")


@dataclasses.dataclass
class WarmStartConfig:
    """Stage 1 of a two-stage run (opd/stages.py): train the student with ``method`` first, then run this config's
    method from its final checkpoint, as the papers start on-policy distillation from a fine-tuned student.

    Stage 1 is the run's own config with ``method``, ``trainer`` and ``seed`` replaced, so every job of a sweep over
    stage 2 (methods, seeds, method knobs) builds the same stage-1 config and shares one warm start: it is computed
    once into a directory named by that config's hash, resumed there after an interruption, and reused afterwards.
    """

    method: str = "seqkd"  # conf/method/<name>.yaml trained in stage 1
    method_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # keys of that method node
    trainer: dict[str, Any] = dataclasses.field(default_factory=dict)  # stage 1's trainer keys (max_steps, lr...) over the run's
    seed: int = 0  # stage 1's seed: the same warm start for every seed of stage 2
    dir: Optional[str] = None  # stage 1's run directory; null = logs/<name>/warm_starts/<method>-<hash of its config>


@dataclasses.dataclass
class TeacherFinetuneConfig(WarmStartConfig):
    """Stage 0 of a staged run (opd/stages.py): fine-tune the *teacher* on the task first, as GKD's teachers are
    (Agarwal et al. 2024, Sec. 4: T5-XL supervised fine-tuned on each task), then distil from that checkpoint.

    Stage 0 is the run's config with the teacher's model as the student (all layers), ``method`` (default SFT on the
    dataset's gold outputs), ``trainer`` and ``seed`` replaced; it is trained once into a directory named by that
    config's hash and reused by every job, like a warm start. The warm start (if any) and stage 2 then use its final
    checkpoint as ``teacher.name_or_path``.
    """

    method: str = "sft"  # conf/method/<name>.yaml trained in stage 0 (sft: the dataset's gold outputs)
    dir: Optional[str] = None  # stage 0's run directory; null = logs/<name>/teachers/<method>-<hash of its config>


@dataclasses.dataclass
class TrainConfig:
    """The whole run. Group nodes (method, sampler, data, teacher) are validated by their registries."""

    method: Any = MISSING  # conf/method/<name>.yaml
    teacher: Any = None  # conf/teacher/<name>.yaml, checked by its kind's schema (opd/teachers/); null for teacher-free methods
    teachers: Any = None  # several teachers: name -> teacher node; each example goes to the one named by its data source
    #                       (Example.source, data=mixture; opd/teachers/router.py). Needs teacher null (~teacher)
    student: ModelConfig = MISSING  # conf/student/<name>.yaml
    sampler: Any = MISSING  # conf/sampler/<name>.yaml
    data: Any = MISSING  # conf/data/<name>.yaml
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    logger: LoggerConfig = dataclasses.field(default_factory=LoggerConfig)
    deepspeed: DeepSpeedConfig = dataclasses.field(default_factory=DeepSpeedConfig)
    seed: int = 0  # seeds python, numpy, torch and the λ coin
    # null = one stage | a stage-1 method whose final student this run starts from (WarmStartConfig; typed Any so that a
    # mapping can replace null from the command line, checked by WarmStartConfig at start-up)
    warm_start: Any = None
    # null = the teacher as configured | a stage-0 fine-tuning of the teacher on the task before anything else
    # (TeacherFinetuneConfig; typed Any like warm_start); needs a local Hugging Face teacher (kind hf)
    teacher_finetune: Any = None
    name: str = "default"  # experiment name: run directory and W&B group
    output_dir: Optional[str] = None  # run directory; Hydra's when null


# ------------------------------------------------------------------ the teacher node, typed through the registry
#: the kind of a ``teacher`` node without a ``kind`` key (every local-model entry of conf/teacher/)
DEFAULT_TEACHER_KIND = "hf"


def teacher_config(node: DictConfig | dict | None, kind: str | None = None) -> Any:
    """The ``teacher`` node checked against its kind's schema (unknown keys, types, ranges): the kind's ``Config``.

    Args:
        node: the composed ``teacher`` section, or None.
        kind: a kind fixed by the method (OPSD: ``initial_student``): the node is then not read.
    Returns:
        The ``Config`` instance, or None when there is no teacher.
    Raises:
        ConfigError: one line naming the key (``teacher.server_topk``) and the kind's valid keys.
    """
    resolved = resolve_teacher(node, kind)
    return None if resolved is None else resolved[1]


def node_schema() -> type:
    """The ``teacher`` node as Hydra types it: ``kind`` and every key of every registered kind, each optional (None).

    Only the chosen kind's keys are read (:func:`teacher_config`): keys left None are dropped before its own schema
    checks the rest, so a key set to null explicitly means its kind's default.
    """
    names = ["kind"] + [f.name for kind in TEACHERS for f in dataclasses.fields(TEACHERS.get(kind).Config)]
    fields = [(name, Optional[Any], dataclasses.field(default=None)) for name in dict.fromkeys(names)]
    return dataclasses.make_dataclass("TeacherNode", fields)


def resolve_teacher(node: DictConfig | dict | None, kind: str | None) -> tuple[str, Any] | None:
    """(kind, its ``Config``) of a ``teacher`` node (or of a method's fixed ``kind``), found through the registry.

    A fixed ``kind`` (a self-distillation method's own teacher) takes its keys from ``node`` when the node selects that
    same kind (``teacher=ema teacher.update_rate=0.1``), and its defaults otherwise (the node is then not read)."""
    if node is not None:
        node = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        node = {key: value for key, value in node.items() if value is not None}  # other kinds' keys (see node_schema)
    if kind is not None and (node is None or node.get("kind", DEFAULT_TEACHER_KIND) != kind):
        return kind, TEACHERS.get(kind).Config()
    if node is None:
        return None
    chosen = node.pop("kind", DEFAULT_TEACHER_KIND)
    kwargs = TEACHERS.validate({**node, "kind": chosen}, "teacher")
    try:  # a kind's own range checks (an EMA's update_rate)
        return chosen, TEACHERS.get(chosen).Config(**kwargs)
    except ValueError as err:
        raise ConfigError(f"teacher (kind {chosen}): {err}") from None


def register_configs() -> None:
    """Put the schema into Hydra's ConfigStore (``train_schema`` is the root's first default).

    The ``teacher`` node is typed by :func:`node_schema`, every key of every registered teacher kind, so
    ``teacher.chat_template=true`` overrides a key its YAML entry does not set; the kind's own schema checks it later.
    """
    node = node_schema()
    schema = dataclasses.make_dataclass("TrainConfig", [("teacher", Optional[node], None),
                                                        ("teachers", Optional[dict[str, node]], None)], bases=(TrainConfig,))
    ConfigStore.instance().store(name="train_schema", node=schema)


#: the fixed (typed) sections
SECTIONS: dict[str, type] = {"student": ModelConfig, "trainer": TrainerConfig,
                              "logger": LoggerConfig, "deepspeed": DeepSpeedConfig, "warm_start": WarmStartConfig,
                              "teacher_finetune": TeacherFinetuneConfig}


def section_keys(section: str) -> set[str]:
    """The valid keys of a fixed section, or of ``teacher`` (those of every registered teacher kind, and ``kind``)."""
    if section == "teacher":
        return {f.name for f in dataclasses.fields(node_schema())}
    return {f.name for f in dataclasses.fields(SECTIONS[section])}


def typed_sections(cfg: Any) -> tuple[Any, ModelConfig, TrainerConfig, LoggerConfig]:
    """The teacher as its kind's ``Config`` (:func:`teacher_config`: ``ModelConfig`` for ``kind: hf``), or None, and
    the :func:`fixed_sections`. ``build_trainer`` resolves the teacher once, with the method's fixed kind, and reads
    only the fixed sections."""
    return (teacher_config(cfg.get("teacher")), *fixed_sections(cfg))


def fixed_sections(cfg: Any) -> tuple[ModelConfig, TrainerConfig, LoggerConfig]:
    """The student, trainer and logger sections as dataclasses, which runs their range checks (``__post_init__``).

    Unknown keys anywhere in the fixed part (a ``+foo=1`` or ``+trainer.lrr=1`` override gets past the
    schema) are refused first by :func:`check_known_keys`.
    """
    check_known_keys(cfg)

    def build(key: str, schema: type) -> Any:
        node = cfg.get(key)
        if node is None:
            return None
        return schema(**OmegaConf.to_container(node, resolve=True))

    return build("student", ModelConfig), build("trainer", TrainerConfig), build("logger", LoggerConfig)


def deepspeed_section(cfg: Any) -> DeepSpeedConfig:
    """The ``deepspeed`` section as a dataclass (defaults: disabled) with its range checks run."""
    node = cfg.get("deepspeed")
    if node is None:
        return DeepSpeedConfig()
    _check_section_keys("deepspeed", node)
    return DeepSpeedConfig(**OmegaConf.to_container(node, resolve=True))


def check_known_keys(cfg: Any) -> None:
    """Refuse a top-level key that ``TrainConfig`` lacks, or a key of a fixed section its dataclass lacks.

    Hydra's ``+key=value`` and ``++key=value`` add keys past the typed schema; the ``method``,
    ``sampler`` and ``data`` nodes are checked by their registries instead.

    Raises:
        ConfigError: naming the key and listing the valid ones.
    """
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in cfg:
        if key not in valid:
            raise unknown_key_error(str(key), valid)
    for section in (*SECTIONS, "teacher"):
        node = cfg.get(section)
        if node is not None:
            _check_section_keys(section, node)


def _check_section_keys(section: str, node: Any) -> None:
    valid = section_keys(section)
    for key in node:
        if key not in valid:
            raise unknown_key_error(f"{section}.{key}", valid, section)


def group_options(conf_dir: str | Path, group: str) -> list[str]:
    """The options of a config group: ``conf/<group>/**/*.yaml`` as ``name`` or ``sub/name``."""
    root = Path(conf_dir) / group
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def check_cli_overrides(args: list[str], conf_dir: str | Path) -> None:
    """Check command-line overrides before Hydra composes anything: a group option must exist
    (``experiment=nope``), and a key of the root or of a fixed section must be in the schema
    (``trainer.lrr=1``, ``+foo=1``), and so must a key of ``method``/``sampler``/``data`` in the class
    the command line chooses (``method.betaa=1``). Hydra would print several lines, or nothing for a ``+`` key.

    Left to Hydra (and to :func:`check_known_keys` and the registries after composition): command lines
    with flags other than ``-m``/``-r``/``--resolve`` (another config, ``--cfg``, ``--help``), group
    options and component keys when ``hydra.searchpath`` adds config directories, and glob and range sweeps.

    Args:
        args: the command line after the program name (``sys.argv[1:]``).
        conf_dir: the primary config directory (``conf/``).

    Raises:
        ConfigError: naming the override and listing the valid options or keys.
    """
    if any(a.startswith("-") and a not in ("-m", "--multirun", "-r", "--run", "--resolve") for a in args):
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except Exception:  # noqa: BLE001 - a malformed override: Hydra reports it in its own words
        return
    conf_dir = Path(conf_dir)
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir() and p.name != "hydra"}
    own_search_path = not any(o.key_or_group == "hydra.searchpath" for o in overrides)
    root_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    for override in overrides:
        key = override.key_or_group
        if override.is_hydra_override() or override.is_delete() or "/" in key:
            continue
        if key in groups:
            if not own_search_path:
                continue
            if override.value_type == ValueType.ELEMENT:
                choices = [override.value()]
            elif override.value_type in (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP):
                choices = list(override.sweep_string_iterator())
            else:  # glob, range and interval sweeps: Hydra expands and checks them
                continue
            options = group_options(conf_dir, key)
            for choice in choices:
                if choice not in (None, "null") and str(choice) not in options:
                    close = difflib.get_close_matches(str(choice), options, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ConfigError(f"unknown {key} {str(choice)!r}: no conf/{key}/{choice}.yaml{hint}; "
                                      f"available: {', '.join(options) or '(none)'}")
            continue
        section, _, rest = key.partition(".")
        if not rest and section not in root_keys:
            raise unknown_key_error(section, root_keys | groups)
        if rest and (section in SECTIONS or section == "teacher"):
            valid = section_keys(section)
            if rest.split(".")[0] not in valid:
                raise unknown_key_error(f"{section}.{rest.split('.')[0]}", valid, section)
    if own_search_path:
        _check_component_keys(overrides, groups, conf_dir)


#: sections whose valid keys are those of the registered class their ``name`` picks
COMPONENT_SECTIONS = ("method", "sampler", "data")
#: a sweep's group choices checked at most (each is one compose, ~0.1 s); jobs past them are checked as they start
MAX_CHECKED_JOBS = 32


def _check_component_keys(overrides: list[Any], groups: set[str], conf_dir: Path) -> None:
    """``method.betaa=1`` (with or without ``+``): the keys of ``method``/``sampler``/``data`` depend on the class the
    command line chooses, so compose the group choices alone (no key overrides) to learn it, then check each key
    against that class's schema, as :meth:`opd.registry.Registry.validate` will. A sweep over groups is checked job
    by job (its first :data:`MAX_CHECKED_JOBS` combinations)."""
    keyed = [o for o in overrides if o.key_or_group.partition(".")[0] in COMPONENT_SECTIONS and "." in o.key_or_group
             and not o.is_delete()]
    if not keyed:
        return
    import itertools

    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.types import ValueType

    from opd.registry import DATASETS, METHODS, SAMPLERS, load_builtin_components

    lines = []  # each group choice as its options: one for `method=gkd`, two for `method=gkd,sft`
    for o in (o for o in overrides if o.key_or_group in groups):
        if o.value_type == ValueType.ELEMENT:
            lines.append([o.input_line])
        elif o.value_type in (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP):
            lines.append([f"{o.input_line.partition('=')[0]}={choice}" for choice in o.sweep_string_iterator()])
        else:  # glob and range sweeps: Hydra expands them
            return
    combinations = list(itertools.islice(itertools.product(*lines), MAX_CHECKED_JOBS))
    load_builtin_components()
    registries = {"method": METHODS, "sampler": SAMPLERS, "data": DATASETS}
    for combination in combinations:
        try:
            with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base="1.3"):
                cfg = compose(config_name="train", overrides=list(combination))
        except Exception:  # noqa: BLE001 - a composition Hydra refuses: it reports that in its own words
            return
        for override in keyed:
            section, _, rest = override.key_or_group.partition(".")
            node, registry = cfg.get(section), registries[section]
            if node is None or node.get(registry.name_key) not in registry:
                continue  # no entry chosen, or an unknown name: the registry's own check names it
            registry.check_keys(node[registry.name_key], [rest.split(".")[0]], section)


def flatten_config(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"method": {"beta": 0.5}} -> {"method.beta": 0.5} (W&B run config, and opd-report's columns)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten_config(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _asset(relative: str) -> str:
    """``${asset:toy/teacher}`` -> absolute path of a checkpoint shipped inside the package."""
    return str(ASSETS / relative)


def _safe_dirname(overrides: str, max_length: int = 120) -> str:
    """Sweep subdirectory name from ``method=gkd,seed=1``: path separators replaced, long names cut."""
    name = overrides.replace("/", "_").replace("\\", "_") or "default"
    return name if len(name) <= max_length else name[:max_length] + "..."


for _name, _fn in (("asset", _asset), ("safe_dirname", _safe_dirname)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)
