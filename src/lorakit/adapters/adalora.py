"""AdaLoRA (Zhang et al. 2023): SVD-shaped adapters whose ranks a budget schedule prunes while training.

    delta(x) = alpha / (ranknum + 1e-5) * B (A * E) dropout(x)

P = B: [out, r], Lambda = E: [r, 1], Q = A: [r, in] (PEFT's `lora_B`, `lora_E`, `lora_A`). A and B start
as N(0, 0.02), E at zero, so a fresh adapter leaves the model unchanged. `ranknum` is the initial rank;
it stays the divisor when triplets are pruned, so pruning never rescales the kept ones (PEFT's rule).

The rank allocator scores each triplet (A_i, E_i, B_:,i) by the sensitivity |p * grad| of its entries,
smoothed by an EMA (beta1) and multiplied by its uncertainty (EMA beta2 of the deviation), and zeroes
the E of the lowest-scoring triplets until the total rank fits a budget that falls cubically from
init_r x modules to target_r x modules between steps tinit and total_step - tfinal. The trainer calls it
after every optimizer step; the orthogonal regularization of A and B is added to the loss. Everything
here follows PEFT's RankAllocator and AdaLoraModel step for step, so masks and budgets agree with PEFT's.

On disk (PEFT's ADALORA format): keys `<module>.lora_A`, `.lora_E`, `.lora_B` (no `.weight`), tensors
cut to their kept triplets, and `rank_pattern` mapping `<module>.lora_E` to its boolean mask over the
initial rank.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.layer import lora_layers
from lorakit.adapters.lora import LoraAdapter
from lorakit.adapters.spec import AdaLoraSpec, LoraSpec
from lorakit.adapters.state import adapters_of

if TYPE_CHECKING:
    from lorakit.adapters.layer import LoraLayer


class AdaLoraAdapter(LoraAdapter):
    """The P Lambda Q factors of one AdaLoRA adapter on one layer.

    Shares LoraAdapter's hooks (forward, merge/unmerge) and arguments (rslora and init have no effect), with
    its own factors, init and scale: alpha / ranknum. A pruned adapter may be loaded at rank 0."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, **kwargs) -> None:
        if kwargs.get("embedding"):
            raise ValueError("AdaLoRA adapts Linear, Conv1D and 4-bit linear layers, not embeddings (as PEFT)")
        super().__init__(in_features, out_features, r, alpha, **kwargs)
        self.ranknum = float(r)  # the initial rank: the scale's divisor, kept when triplets are pruned
        self.rank_mask: torch.Tensor | None = None  # [ranknum] bool, the allocator's last mask (None: never masked)

    @property
    def scale(self) -> float:
        return self.alpha / (self.ranknum + 1e-5)

    def add_factors(self, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        """P Lambda Q: A [r, in], E [r, 1], B [out, r]."""
        self.lora_A = nn.Parameter(torch.empty(self.r, in_features, dtype=dtype))
        self.lora_E = nn.Parameter(torch.empty(self.r, 1, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, self.r, dtype=dtype))

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        """PEFT's AdaLoRA init: A, B ~ N(0, 0.02), E = 0."""
        nn.init.normal_(self.lora_A, std=0.02)
        nn.init.normal_(self.lora_B, std=0.02)
        nn.init.zeros_(self.lora_E)

    @torch.no_grad()
    def init_from_base(self, layer: LoraLayer) -> None:
        """Nothing reads the base weight."""

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """alpha / ranknum * B (A * E) x, without dropout."""
        h = F.linear(x.to(self.lora_A.dtype), self.lora_A * self.lora_E)  # [..., r]
        return F.linear(h, self.lora_B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """alpha / ranknum * B (A * E) as an [out, in] matrix."""
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scale

    def peft_names(self) -> dict[str, str]:
        return {"lora_A": "lora_A", "lora_E": "lora_E", "lora_B": "lora_B"}


def adalora_adapters(model: nn.Module, name: str) -> list[tuple[str, AdaLoraAdapter]]:
    """(layer path, adapter) for every layer holding AdaLoRA adapter `name`, in module order."""
    return [(path, layer.adapters[name]) for path, layer in lora_layers(model)
            if name in layer.adapters and isinstance(layer.adapters[name], AdaLoraAdapter)]


# ----------------------------------------------------------------------------- training


def orth_regularization(adapters: list[AdaLoraAdapter]) -> torch.Tensor:
    """PEFT's orthogonal regularization: the mean over all A and B of ||A A^T - I||_F and ||B^T B - I||_F."""
    terms = []
    for adapter in adapters:
        for cov in (adapter.lora_A @ adapter.lora_A.T, adapter.lora_B.T @ adapter.lora_B):  # [r, r]
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)))
    return torch.stack(terms).mean()


class RankAllocator:
    """PEFT's RankAllocator and AdaLoraModel.update_and_allocate for adapter `name` of `model`.

    `step(global_step)` is called after each optimizer step (1-based), before the gradients are zeroed."""

    def __init__(self, model: nn.Module, name: str, settings: AdaLoraSpec, total_step: int) -> None:
        if not 0 < settings.beta1 < 1 or not 0 < settings.beta2 < 1:
            raise ValueError("AdaLoRA's beta1 and beta2 must be in (0, 1)")
        if settings.tinit >= total_step - settings.tfinal:
            raise ValueError(f"AdaLoRA: tinit={settings.tinit} and tfinal={settings.tfinal} leave no steps to "
                             f"prune ranks in a run of {total_step} steps")
        self.name, self.settings, self.total_step = name, settings, total_step
        self.adapters = adalora_adapters(model, name)
        if not self.adapters:
            raise ValueError(f"model has no AdaLoRA adapter {name!r}")
        pruned = [path for path, a in self.adapters if a.rank_mask is not None and a.r != len(a.rank_mask)]
        if pruned:
            raise ValueError(f"AdaLoRA adapter {name!r} was loaded pruned (at {pruned[0]}); it cannot be re-allocated")
        self.init_budget = sum(a.r for _, a in self.adapters)
        self.target_budget = settings.target_r * len(self.adapters)
        self.reset_scores()

    def reset_scores(self) -> None:
        self.ema_ipt: dict[tuple[str, str], torch.Tensor] = {}  # (path, factor) -> smoothed sensitivity
        self.ema_unc: dict[tuple[str, str], torch.Tensor] = {}  # (path, factor) -> uncertainty

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(total rank budget, whether to mask) at `step`: init_budget until tinit, cubic decay to the target
        at total_step - tfinal, target after; masking every deltaT steps in between."""
        s = self.settings
        if step <= s.tinit:
            return self.init_budget, False
        if step > self.total_step - s.tfinal:
            return self.target_budget, True
        left = 1 - (step - s.tinit) / (self.total_step - s.tfinal - s.tinit)
        return int((self.init_budget - self.target_budget) * left**3 + self.target_budget), step % s.deltaT == 0

    @torch.no_grad()
    def update_scores(self) -> None:
        """EMA of the sensitivity |p * grad| of every entry (beta1), and of its deviation (beta2)."""
        b1, b2 = self.settings.beta1, self.settings.beta2
        for path, adapter in self.adapters:
            for factor in ("lora_A", "lora_E", "lora_B"):
                p = getattr(adapter, factor)
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                ipt = (p * grad).abs()
                key = (path, factor)
                ema = b1 * self.ema_ipt.get(key, torch.zeros_like(p)) + (1 - b1) * ipt
                self.ema_unc[key] = b2 * self.ema_unc.get(key, torch.zeros_like(p)) + (1 - b2) * (ipt - ema).abs()
                self.ema_ipt[key] = ema

    def triplet_scores(self, path: str) -> torch.Tensor:
        """[r] score of each triplet: its E entry's plus the row mean over A_i and column mean over B_:,i."""
        score = {f: self.ema_ipt[(path, f)] * self.ema_unc[(path, f)] for f in ("lora_A", "lora_E", "lora_B")}
        a = score["lora_A"].mean(dim=1, keepdim=True)  # [r, 1]
        b = score["lora_B"].mean(dim=0).view(-1, 1)  # [r, 1]
        return score["lora_E"].view(-1) + torch.cat([a, b], dim=1).sum(dim=1)

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        """Zero E of the lowest-scoring triplets over all modules, keeping those above the
        (init_budget - budget)-th smallest score; each adapter keeps its mask for saving."""
        scores = {path: self.triplet_scores(path) for path, _ in self.adapters}
        k = self.init_budget - budget
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values.item() if k > 0 else -float("inf")
        for path, adapter in self.adapters:
            keep = scores[path] > threshold  # [r]
            adapter.lora_E.masked_fill_(~keep[:, None], 0.0)
            adapter.rank_mask = keep.cpu()

    @torch.no_grad()
    def apply_masks(self) -> None:
        for _, adapter in self.adapters:
            if adapter.rank_mask is not None:
                adapter.lora_E.masked_fill_(~adapter.rank_mask.to(adapter.lora_E.device)[:, None], 0.0)

    def step(self, global_step: int) -> int:
        """Update the scores and mask to the schedule's budget; fix the final masks at total_step - tfinal
        and hold them after. Returns the budget."""
        boundary = self.total_step - self.settings.tfinal
        budget, mask_now = self.budget_schedule(global_step)
        if global_step < boundary:
            self.update_scores()
            if mask_now:
                self.mask_to_budget(budget)
        elif global_step == boundary:
            if self.ema_ipt:
                self.mask_to_budget(budget)
            self.reset_scores()
        else:
            self.apply_masks()
        return budget

    def orth_loss(self) -> torch.Tensor:
        """orth_reg_weight x the orthogonal regularization, to add to the loss."""
        return self.settings.orth_reg_weight * orth_regularization([a for _, a in self.adapters])

    def state_dict(self) -> dict:
        """What a resumed run needs to allocate as an uninterrupted one: the EMAs of importance and
        uncertainty ("<path>:<factor>" -> tensor) and each adapter's last mask (the step is the trainer's)."""
        return {
            "ema_ipt": {f"{path}:{factor}": t.clone() for (path, factor), t in self.ema_ipt.items()},
            "ema_unc": {f"{path}:{factor}": t.clone() for (path, factor), t in self.ema_unc.items()},
            "masks": {path: a.rank_mask.clone() for path, a in self.adapters if a.rank_mask is not None},
        }

    def load_state_dict(self, state: dict) -> None:
        paths = {path for path, _ in self.adapters}
        named = {key.rsplit(":", 1)[0] for key in [*state["ema_ipt"], *state["ema_unc"]]} | set(state["masks"])
        unknown = sorted(named - paths)
        if unknown:
            raise ValueError(f"AdaLoRA allocator state names module {unknown[0]!r}, which has no adapter to allocate")
        split = lambda key: tuple(key.rsplit(":", 1))
        self.ema_ipt = {split(k): t.to(self.device_of(k)) for k, t in state["ema_ipt"].items()}
        self.ema_unc = {split(k): t.to(self.device_of(k)) for k, t in state["ema_unc"].items()}
        for path, adapter in self.adapters:
            adapter.rank_mask = state["masks"][path].clone() if path in state["masks"] else None

    def device_of(self, key: str) -> torch.device:
        path = key.rsplit(":", 1)[0]
        return next(a.lora_A.device for p, a in self.adapters if p == path)


def make_allocator(model: nn.Module, total_step: int) -> RankAllocator | None:
    """The allocator of the model's trainable AdaLoRA adapter (None if it has none). Its `total_step`
    is the spec's, or the run's (then written into the spec, so that saving records it)."""
    specs = adapters_of(model).specs
    names = [n for n, s in specs.items() if s.kind == "adalora"
             and any(a.lora_E.requires_grad for _, a in adalora_adapters(model, n))]
    if not names:
        return None
    if len(names) > 1:
        raise ValueError(f"AdaLoRA trains one adapter at a time (as PEFT); trainable ones: {names}")
    spec = specs[names[0]]
    if spec.adalora.total_step is None:
        spec = dataclasses.replace(spec, adalora=dataclasses.replace(spec.adalora, total_step=total_step))
        specs[names[0]] = spec
    return RankAllocator(model, names[0], spec.adalora, spec.adalora.total_step)


def final_ranks(model: nn.Module, name: str) -> dict[str, int]:
    """Kept rank per adapted module: the mask's count if masked, else the factors' rank."""
    adapters = adalora_adapters(model, name)
    return {path: int(a.rank_mask.sum()) if a.rank_mask is not None else a.r for path, a in adapters}


def rank_grid(ranks: dict[str, int]) -> tuple[list[int | None], list[str], list[list[int | None]]]:
    """(layers, modules, grid): module paths `...layers.<i>...<module>` arranged as grid[layer][module] ->
    rank (None where a layer lacks that module); a path with no number goes to a row labelled None."""
    cells: dict[tuple[int | None, str], int] = {}
    for path, r in ranks.items():
        parts = path.split(".")
        layer = next((int(p) for p in parts if p.isdigit()), None)
        cells[(layer, parts[-1])] = r
    layers = sorted({layer for layer, _ in cells}, key=lambda x: (x is None, x or 0))
    modules = list(dict.fromkeys(module for _, module in cells))  # in model order
    return layers, modules, [[cells.get((layer, m)) for m in modules] for layer in layers]


# ----------------------------------------------------------------------------- PEFT's file format


def saved_factors(adapter: AdaLoraAdapter) -> dict[str, torch.Tensor]:
    """A, E, B cut to the kept triplets (PEFT saves pruned adapters at their pruned ranks)."""
    mask = adapter.rank_mask
    if mask is None or adapter.r != len(mask):  # never masked, or loaded already cut
        return {}
    keep = mask.to(adapter.lora_A.device)
    return {"lora_A": adapter.lora_A[keep], "lora_E": adapter.lora_E[keep], "lora_B": adapter.lora_B[:, keep]}


def peft_config(config: dict, model: nn.Module, name: str, spec: LoraSpec) -> dict:
    """PEFT's LoRA config fields `config` turned into its AdaLoraConfig fields for adapter `name`."""
    s = spec.adalora
    adapters = adalora_adapters(model, name)
    masked = any(a.rank_mask is not None for _, a in adapters)
    rank_pattern = {f"{path}.lora_E": (a.rank_mask if a.rank_mask is not None else torch.ones(a.r, dtype=torch.bool))
                    .tolist() for path, a in adapters} if masked else None
    return {
        **config,
        "peft_type": "ADALORA",
        "r": 8,  # PEFT's default: AdaLoRA ignores r (and warns when it differs) and uses init_r
        "init_r": spec.r,
        "target_r": s.target_r,
        "tinit": s.tinit,
        "tfinal": s.tfinal,
        "deltaT": s.deltaT,
        "beta1": s.beta1,
        "beta2": s.beta2,
        "orth_reg_weight": s.orth_reg_weight,
        "total_step": s.total_step if s.total_step is not None else s.tinit + s.tfinal + 1,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }


def spec_from_peft(config: dict) -> LoraSpec:
    """The LoraSpec of a PEFT AdaLoraConfig (its `rank_pattern` masks are read by `masks_from_peft`)."""
    defaults = AdaLoraSpec()
    settings = AdaLoraSpec(**{f.name: config.get(f.name, getattr(defaults, f.name))
                              for f in dataclasses.fields(AdaLoraSpec)})
    return LoraSpec(
        r=config.get("init_r", 12),
        alpha=config["lora_alpha"],
        dropout=config.get("lora_dropout") or 0.0,
        targets=config.get("target_modules"),
        bias=config.get("bias") or "none",
        modules_to_save=config.get("modules_to_save"),
        kind="adalora",
        adalora=settings,
    )


def masks_from_peft(config: dict) -> dict[str, torch.Tensor]:
    """Module path -> boolean mask over the initial rank, from PEFT's `rank_pattern`."""
    pattern = config.get("rank_pattern") or {}
    return {key.removesuffix(".lora_E"): torch.tensor(value, dtype=torch.bool).view(-1)
            for key, value in pattern.items()}


def factor_problem(pair: dict[str, torch.Tensor], mask: torch.Tensor | None, init_r: int) -> str | None:
    """What is wrong with a saved module's AdaLoRA factors given its mask, or None."""
    if "lora_E" not in pair:
        return "has no lora_E tensor"
    r = pair["lora_A"].shape[0]
    if tuple(pair["lora_E"].shape) != (r, 1):
        return f"has lora_E {list(pair['lora_E'].shape)}, expected [{r}, 1]"
    expected = int(mask.sum()) if mask is not None else init_r
    if mask is not None and len(mask) != init_r:
        return f"has a rank_pattern mask of length {len(mask)} but init_r is {init_r}"
    if r != expected:
        return f"has rank {r} but the config says {expected}"
    return None


def restore_masks(adapter: AdaLoraAdapter, init_r: int, mask: torch.Tensor | None) -> None:
    """A loaded (possibly pruned) adapter divides by the initial rank and remembers its mask, as PEFT."""
    adapter.ranknum = float(init_r)
    adapter.rank_mask = mask


def rank_report(spec: LoraSpec, lora: dict[str, dict[str, torch.Tensor]], masks: dict[str, torch.Tensor]) -> str:
    """A table of the rank of each adapted module of a saved adapter (`lorakit inspect`): for AdaLoRA the
    kept triplets out of init_r, and the total against the target budget."""
    width = max([len(m) for m in lora] + [6])
    lines = [f"kind: {spec.kind}  r: {spec.r}" + (f"  target_r: {spec.adalora.target_r}" if spec.adalora else ""),
             f"{'module':<{width}}  rank"]
    if spec.target_parameters:  # PEFT's ParamWrapper keys: one row per adapted parameter, rank x experts
        lines.insert(1, f"target_parameters: {', '.join(spec.target_parameters)} (rows of their modules show "
                        "rank x experts; `.base_layer` rows are parameters adapted earlier on the same module)")
    total = 0
    for module in sorted(lora):
        r = lora[module]["lora_A"].shape[0]
        total += r
        initial = len(masks[module]) if module in masks else r
        lines.append(f"{module:<{width}}  {r}/{initial}" if spec.kind == "adalora" else f"{module:<{width}}  {r}")
    target = f"  (target {spec.adalora.target_r * len(lora)})" if spec.adalora else ""
    lines.append(f"{'total':<{width}}  {total}{target}")
    return "\n".join(lines)
