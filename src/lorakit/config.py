"""Configuration dataclasses (training, quantization, LongLoRA) and YAML + `key=value` loading.

Every config is a plain dataclass. A YAML file and dotted `key=value` overrides are merged
into it field by field; an unknown key is an error naming the key, where it came from, and the
nearest valid name. Each value is checked against its field's type before anything runs
(`typed`): a number written `3e-4` (a string to YAML 1.1) is taken as the number, anything else of
the wrong type is an error naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorakit.adapters.spec import AdaLoraSpec, LoraSpec, check_positive_int  # noqa: F401 (AdaLoraSpec: re-exported)
from lorakit.data.encode import CHAT_TEMPLATES
from lorakit.data.formats import FORMATS
from lorakit.data.tasks import TASK_PREFIX, get_task, task_name
from lorakit.devices import PRECISIONS, check_device_name
from lorakit.models import DTYPE_CHOICES
from lorakit.quant.optim import OPTIMIZERS

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class QuantConfig:
    """A 4-bit base (QLoRA): every linear layer but the output head is stored NF4/FP4 and frozen."""

    type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: str = "auto"  # auto: bf16 where the run's precision is bf16 on CUDA, else fp32 (the CPU)

    def __post_init__(self) -> None:
        if self.type not in QUANT_TYPES:
            raise ValueError(f"type must be one of {QUANT_TYPES}, got {self.type!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        check_positive_int("blocksize", self.blocksize)
        if not 32 <= self.blocksize <= 4096 or self.blocksize & (self.blocksize - 1):
            raise ValueError(f"blocksize must be a power of two in 32..4096, got {self.blocksize}")


@dataclass
class LongLoraConfig:
    """LongLoRA: S2-Attn while training, RoPE position interpolation, embeddings and norms trained."""

    group_size_ratio: float = 0.25
    target_context: int | None = None  # interpolate RoPE linearly from the native context to this
    trainable: list[str] = field(default_factory=lambda: ["embed", "norm"])

    def __post_init__(self) -> None:
        if not 0 < self.group_size_ratio <= 1:
            raise ValueError(f"group_size_ratio must be in (0, 1], got {self.group_size_ratio}")


# The default peak learning rates. AdaLoRA's is 5x LoRA's: its update B diag(E) A starts from three small
# factors (E = 0, A and B ~ N(0, 0.02), as PEFT's), where LoRA's B A has one zero and one kaiming factor, so at
# LoRA's lr it moves several times slower: on the demo, AdaLoRA r=12 -> 8 reached 59% held-out exact match in the
# default 30 steps at 2e-3 and 100% at 1e-2 (docs/RESULTS.md, "Learning curves").
DEFAULT_LR = 2e-3
ADALORA_LR = 1e-2


@dataclass
class TrainConfig:
    """One fine-tuning run: base model, adapter spec, data, optimisation, output.

    The defaults are the built-in demo's, validated on SmolLM2-135M-Instruct on 2 CPU cores
    (held-out exact match 0% before, 100% after 30 steps; 20 steps already suffice).

    `dataset`: "demo" (the built-in task), "task:NAME" (a task of the built-in suite, `lorakit.data.tasks`;
    task:demo is the demo), a file or folder (JSONL/JSON/CSV/Parquet), a list of them, or a list of
    {path, weight}; the row format is detected unless `format` names it. `demo_train` and `demo_eval`
    size whichever built-in task is chosen.
    Exactly one of `max_steps` / `epochs` bounds the run (`max_steps` wins when both are set).
    """

    base: str = "default"
    dtype: str = "auto"  # how the base's float weights are stored: auto (as in the checkpoint) or a float dtype
    dataset: str | list = "demo"
    eval_dataset: str | list | None = None
    val_size: float | None = None
    format: str | None = None
    chat_template: str | None = None  # "chatml" or a Jinja template; default: the tokenizer's
    train_on_prompt: bool = False
    truncation: str = "truncate"  # or "drop": rows longer than max_length
    packing: bool = False  # several examples per row of max_length, each attending only to itself
    demo_train: int = 1000  # training rows of a built-in task (the demo or task:NAME)
    demo_eval: int = 100  # held-out rows of a built-in task
    output_dir: str | None = None  # None: runs/demo, runs/task-NAME, else runs/<name of the (first) dataset>
    lora: LoraSpec = field(default_factory=LoraSpec)
    quant: QuantConfig | None = None
    longlora: LongLoraConfig | None = None
    optim: str = "adamw"
    gradient_checkpointing: bool | None = None  # None: on with a 4-bit base, off otherwise
    compile: bool = False  # torch.compile each transformer block (optional; compiling takes a while at start)
    lr: float | None = None  # None: DEFAULT_LR (2e-3), or ADALORA_LR (1e-2) with lora.kind adalora
    loraplus_ratio: float | None = None  # LoRA+: B's lr = ratio x A's lr
    loraplus_embedding_lr: float | None = None  # LoRA+: embedding adapters' lr (default 1e-6, as PEFT)
    weight_decay: float = 0.0
    warmup_steps: int = 5
    max_steps: int | None = 30
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    max_grad_norm: float = 1.0
    schedule: str = "cosine"  # after warmup: cosine or linear decay to 0, or constant
    precision: str = "auto"  # auto: bf16 autocast on a CUDA device with bf16, else fp32; or "fp32", "bf16"
    device: str = "auto"  # auto (cuda when there is one, else cpu), cpu, cuda, cuda:N; torchrun: cuda:LOCAL_RANK
    checkpoint_every: int | None = None  # steps; checkpoints go to output_dir/checkpoint-STEP
    keep_checkpoints: int = 2
    resume: str | None = None  # "auto" (latest checkpoint in output_dir) or a checkpoint folder
    eval_every: int | None = None  # steps between validation loss/perplexity measurements
    early_stopping_patience: int | None = None  # evaluations without a better val_loss; keeps the best
    max_bad_steps: int = 5  # non-finite steps in a row before the run stops
    seed: int = 0
    eval: bool = True
    max_new_tokens: int | None = None  # None: the built-in task's own (the demo's: 12), else 12
    log_every: int = 1
    tensorboard: bool = False  # mirror metrics.jsonl into output_dir/tensorboard (needs the tensorboard package)
    distributed: str = "none"  # "ddp" or "fsdp2" under torchrun (see docs/DISTRIBUTED.md)

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = ADALORA_LR if self.lora.kind == "adalora" else DEFAULT_LR
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        check_device_name(self.device)  # its form only: whether it exists here is checked before the model loads
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.early_stopping_patience and not self.eval_every:
            raise ValueError("early_stopping_patience needs eval_every (and a validation set)")
        if self.truncation not in ("truncate", "drop"):
            raise ValueError(f"truncation must be 'truncate' or 'drop', got {self.truncation!r}")
        template = self.chat_template
        if template is not None and template not in CHAT_TEMPLATES and "{" not in template:  # a name mistyped
            raise ValueError(f"chat_template must be one of {sorted(CHAT_TEMPLATES)} or a Jinja template, "
                             f"got {self.chat_template!r}")
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS} (or null to detect), got {self.format!r}")
        if self.distributed not in ("none", "ddp", "fsdp2"):
            raise ValueError(f"distributed must be none, ddp or fsdp2, got {self.distributed!r}")
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"optim must be one of {OPTIMIZERS}, got {self.optim!r}")
        if self.distributed == "fsdp2" and self.optim != "adamw":  # 8-bit states are not shaped like the shards
            raise ValueError(f"distributed=fsdp2 supports optim=adamw only, got {self.optim!r}")
        self.check_ranges()
        self.check_task()
        if self.output_dir is None:
            self.output_dir = default_output_dir(self.dataset)
        check_optional_dependencies(self)

    def check_ranges(self) -> None:
        """Counts at least 1 (`keep_checkpoints: 0` is an error, not "keep all"), rates positive and finite."""
        for key in ("batch_size", "grad_accum", "keep_checkpoints", "max_length", "log_every", "max_bad_steps",
                    "demo_train", "demo_eval"):
            check_positive_int(key, getattr(self, key))
        for key in ("max_steps", "checkpoint_every", "eval_every", "early_stopping_patience", "max_new_tokens"):
            if getattr(self, key) is not None:
                check_positive_int(key, getattr(self, key))
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        for key in ("lr", "epochs", "val_size", "loraplus_ratio", "loraplus_embedding_lr"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{key} must be a positive number, got {value!r}")
        if not self.max_grad_norm > 0:  # inf: no clipping
            raise ValueError(f"max_grad_norm must be a positive number (.inf: no clipping), got {self.max_grad_norm!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a non-negative number, got {self.weight_decay!r}")


    def check_task(self) -> None:
        """A built-in task (`dataset: demo` or `task:NAME`) exists and has `demo_train + demo_eval` distinct
        examples; `max_new_tokens` left unset becomes the task's own (12 for other datasets)."""
        name = task_name(self.dataset)
        if name is None:
            self.max_new_tokens = self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
            return
        try:
            task = get_task(name)
        except ValueError as e:
            raise ValueError(f"dataset: {e} (dataset: {TASK_PREFIX}NAME)") from None
        if self.demo_train + self.demo_eval > task.size:
            raise ValueError(f"demo_train + demo_eval = {self.demo_train} + {self.demo_eval} exceeds the "
                             f"{task.size} distinct examples of dataset {self.dataset!r}")
        self.max_new_tokens = self.max_new_tokens or task.max_new_tokens


DEFAULT_MAX_NEW_TOKENS = 12  # generation length for exact match on a dataset that is not a built-in task


def default_output_dir(dataset: str | list) -> str:
    """`runs/demo` for the demo, `runs/task-NAME` for a built-in task; otherwise `runs/` + the name of the
    (first) dataset file or folder, so a user's own run does not overwrite the demo's adapter."""
    name = task_name(dataset)
    if name is not None:
        return "runs/demo" if dataset == "demo" else f"runs/task-{name}"
    first = dataset[0] if isinstance(dataset, list) and dataset else dataset
    if isinstance(first, dict):
        first = first.get("path", "")
    name = Path(str(first)).stem if first else ""
    return f"runs/{name or 'run'}"


INSTALL = ".venv/bin/python -m pip install {package}   (or: .venv/bin/python -m pip install -e '.[{extra}]')"


def check_optional_dependencies(cfg: TrainConfig) -> None:
    """What the config asks for that needs an optional package, checked before any model loads, with the
    command that installs it into this project's .venv."""
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("tensorboard: true needs the tensorboard package: "
                         + INSTALL.format(package="tensorboard", extra="tensorboard"))
    sources = [*as_list(cfg.dataset), *as_list(cfg.eval_dataset)]
    paths = [str(s.get("path", "")) if isinstance(s, dict) else str(s) for s in sources]
    parquet = [p for p in paths if p.endswith(".parquet") or (Path(p).is_dir() and any(Path(p).glob("*.parquet")))]
    if parquet and importlib.util.find_spec("pyarrow") is None:
        raise ValueError(f"{parquet[0]}: reading Parquet needs the pyarrow package: "
                         + INSTALL.format(package="pyarrow", extra="parquet"))


def as_list(value: Any) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys with the nearest name."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ValueError(f"{where}: unknown key {key!r}{nearest_hint(key, fields)}")
        section = section_class(hints[key])
        if section is not None and isinstance(value, dict):
            unknown = set(value) - {f.name for f in dataclasses.fields(section)}
            defaults = {} if unknown else nested_defaults(fields[key])
            value = from_dict(section, {**defaults, **value}, f"{where}, section {key!r}")
        try:
            kwargs[key] = typed(value, hints[key], key)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def typed(value: Any, hint: Any, key: str) -> Any:
    """`value` checked against the field type `hint`; a string that reads as a number is taken as that
    number where a float is expected (YAML 1.1 reads `3e-4` as a string). Raises naming `key`."""
    if hint is Any:
        return value
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        origin = typing.get_origin(option) or option
        if dataclasses.is_dataclass(origin) and isinstance(value, origin):  # a section, built by from_dict
            return value
        if origin is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                continue
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            return value
        if origin in (int, str, bool) and type(value) is origin:
            return value
        if origin is list and isinstance(value, list):
            (item,) = typing.get_args(option) or (Any,)
            return [typed(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        if origin is dict and isinstance(value, dict):
            _, item = typing.get_args(option) or (Any, Any)
            return {k: typed(v, item, f"{key}[{k!r}]") for k, v in value.items()}
    expected = " or ".join(TYPE_NAMES.get(typing.get_origin(o) or o, "a section (a mapping of its keys)")
                           for o in options)
    raise ValueError(f"{key}: expected {expected}, got {value!r}")


TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
              dict: "a mapping", type(None): "null"}


def section_class(hint: Any) -> type | None:
    """The dataclass a field holds (`LoraSpec`, or `QuantConfig` of `QuantConfig | None`), if any."""
    candidates = typing.get_args(hint) or (hint,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)


def nested_defaults(f: dataclasses.Field) -> dict[str, Any]:
    """A nested section given partially keeps the other values of the field's own default."""
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.asdict(f.default_factory())
    return {}


def nearest_hint(key: str, names: Any) -> str:
    close = difflib.get_close_matches(key, list(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(names)})"


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML, so numbers, lists and null work)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    if not key:
        raise ValueError(f"override {item!r} has an empty key")
    try:
        return key.split("."), yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        raise ValueError(f"override {item!r}: invalid YAML value {raw!r}{yaml_problem(e)} "
                         "(quote a string that holds brackets, braces or ': ')") from None


def yaml_problem(e: yaml.YAMLError) -> str:
    """": PROBLEM at line L column C" of a YAML error, on one line."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e).splitlines()[0]
    return f": {problem}" + (f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else "")


def load_train_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """YAML file (optional) + dotted overrides -> validated TrainConfig."""
    data, where = read_config(path, overrides)
    return from_dict(TrainConfig, data, where)


def read_config(path: str | Path | None, overrides: list[str] = ()) -> tuple[dict[str, Any], str]:
    """The YAML mapping of `path` (or {}) with the overrides applied, and where it came from (for errors).
    An override's dotted key may index a list: `jobs.1.lr=0.01`."""
    data: dict[str, Any] = {}
    where = "config"
    if path is not None:
        where = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ValueError(f"cannot read config {path}: {e.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML{yaml_problem(e)}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: top level must be a mapping of keys to values")
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            if isinstance(node, list):
                if not k.isdigit() or int(k) >= len(node):
                    raise ValueError(f"override {item!r}: {k!r} is not an index of a list of {len(node)}")
                node = node[int(k)]
            else:
                node = node.setdefault(k, {})
            if not isinstance(node, dict | list):
                raise ValueError(f"override {item!r}: {k!r} is not a section")
        if isinstance(node, list):
            raise ValueError(f"override {item!r}: set a key of one entry ({'.'.join(keys)}.KEY=VALUE)")
        node[keys[-1]] = value
    if path is not None and overrides:
        where = f"{path} + overrides"
    elif overrides:
        where = "overrides"
    return data, where


def load_jobs_config(path: str | Path, overrides: list[str] = ()) -> list[TrainConfig]:
    """A parallel-training file (`lorakit train-multi`): `jobs`, a list of mappings, one TrainConfig each;
    every other top-level key is a default for all jobs (sections merge key by key). Overrides set
    defaults (`lr=0.01`) or one job's keys (`jobs.1.lr=0.01`)."""
    data, where = read_config(path, overrides)
    jobs = data.pop("jobs", None)
    if not isinstance(jobs, list) or not jobs or not all(isinstance(j, dict) for j in jobs):
        raise ValueError(f"{where}: 'jobs' must be a non-empty list of mappings (one training config each), "
                         f"got {type(jobs).__name__ if not isinstance(jobs, list) else jobs!r}")
    return [from_dict(TrainConfig, merge_sections(data, job), f"{where}, jobs[{i}]") for i, job in enumerate(jobs)]


def merge_sections(defaults: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """`own` over `defaults`; a section given in both is merged key by key."""
    merged = dict(defaults)
    for key, value in own.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = merge_sections(merged[key], value) if both else value
    return merged
