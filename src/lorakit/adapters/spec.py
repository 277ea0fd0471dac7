"""An adapter's spec: what to adapt and how (LoraSpec), and AdaLoRA's rank-allocation settings.

These are the adapter core's own types: injection, saving and loading take them, and the application's
config holds one as its `lora` section. Each checks its values when built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

INIT_CHOICES = ("kaiming", "gaussian", "pissa")
KIND_CHOICES = ("lora", "dora", "adalora")
BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass
class AdaLoraSpec:
    """AdaLoRA's rank allocation (PEFT's AdaLoraConfig fields; the initial rank is `LoraSpec.r`)."""

    target_r: int = 8  # average rank per module at the end
    tinit: int = 0  # steps at the initial rank before pruning starts
    tfinal: int = 0  # last steps at the final ranks
    deltaT: int = 1  # steps between two maskings
    beta1: float = 0.85  # EMA of the sensitivity
    beta2: float = 0.85  # EMA of the uncertainty
    orth_reg_weight: float = 0.5
    total_step: int | None = None  # None: the training run's number of steps

    def __post_init__(self) -> None:
        check_positive_int("adalora.target_r", self.target_r)
        check_positive_int("adalora.deltaT", self.deltaT)
        for key in ("tinit", "tfinal"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"adalora.{key} must be a non-negative integer, got {value!r}")
        for key in ("beta1", "beta2"):
            if not 0 < getattr(self, key) < 1:
                raise ValueError(f"adalora.{key} must be in (0, 1), got {getattr(self, key)!r}")
        if not self.orth_reg_weight >= 0:
            raise ValueError(f"adalora.orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if self.total_step is not None and self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"adalora: tinit={self.tinit} and tfinal={self.tfinal} leave no pruning steps "
                             f"in total_step={self.total_step}")


@dataclass
class LoraSpec:
    """What to adapt and how: the LoRA hyper-parameters of one adapter.

    `targets`: "all-linear", a full-match regex string, a list of exact names or dotted
    suffixes, or None for the architecture's default. `rank_pattern`/`alpha_pattern` map a
    regex (matched against a module name's dotted suffix, as PEFT does) to a rank/alpha.
    `target_parameters`: weight matrices held as parameters outside linear layers (fused mixture-of-experts
    `gate_up_proj`/`down_proj`, a router's `gate.weight`), named as PEFT's `target_parameters` (the full
    dotted name or a dotted suffix); with `targets: null` only these are adapted (as in PEFT). "all-linear"
    adapts them all (see docs/CONFIG.md).
    `kind`: "lora", "dora" (weight-decomposed LoRA; PEFT's `use_dora`), or "adalora" (r = init_r,
    `adalora` holds the allocation settings; no rank/alpha patterns, rsLoRA or embeddings). `init`: "kaiming" or
    "gaussian" (B = 0), or "pissa" (A, B from the top-r SVD of W; the base keeps the residual).
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: str | list[str] | None = "all-linear"
    target_parameters: list[str] | None = None
    exclude: str | list[str] | None = None
    bias: str = "none"
    rslora: bool = False
    init: str = "kaiming"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers: list[int] | None = None
    modules_to_save: list[str] | None = None
    kind: str = "lora"
    adalora: AdaLoraSpec | None = None  # kind="adalora" only (None there: the defaults)

    def __post_init__(self) -> None:
        check_positive_int("r", self.r)
        for key, value in self.rank_pattern.items():
            check_positive_int(f"rank_pattern[{key!r}]", value)
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        if self.init not in INIT_CHOICES:
            raise ValueError(f"init must be one of {INIT_CHOICES}, got {self.init!r}")
        if self.kind not in KIND_CHOICES:
            raise ValueError(f"kind must be one of {KIND_CHOICES}, got {self.kind!r}")
        self.check_adalora()
        if isinstance(self.targets, list) and not self.targets:
            raise ValueError("targets is an empty list; use None for the architecture default")
        if self.target_parameters is not None and (not isinstance(self.target_parameters, list)
                                                   or not all(isinstance(t, str) for t in self.target_parameters)):
            raise ValueError(f"target_parameters must be a list of parameter names, got {self.target_parameters!r}")


    def check_adalora(self) -> None:
        """AdaLoRA settings go with kind="adalora" only, which has one initial rank, alpha as its scale,
        and PEFT's init."""
        if self.kind != "adalora":
            if self.adalora is not None:
                raise ValueError(f"adalora settings are given but kind is {self.kind!r}")
            return
        if self.adalora is None:
            self.adalora = AdaLoraSpec()
        if self.rank_pattern or self.alpha_pattern or self.rslora or self.init != "kaiming":
            raise ValueError("kind='adalora' takes no rank_pattern, alpha_pattern, rslora or init (as PEFT's AdaLoRA)")
        if self.adalora.target_r > self.r:
            raise ValueError(f"adalora.target_r={self.adalora.target_r} exceeds the initial rank r={self.r}")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
