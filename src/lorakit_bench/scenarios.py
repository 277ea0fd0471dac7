"""The scenarios `lorakit bench` knows: for each, the builder of every side and what it measures.

Sides: "ours" (lorakit), "peer", and references ("forward", "floor") measured in the same run so
each step can be read as a multiple of the frozen forward and of the floor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from lorakit_bench import ours, peers
from lorakit_bench.workload import Task, Workload


@dataclass(frozen=True)
class Scenario:
    """What one scenario compares."""

    summary: str
    sides: dict[str, Callable[[Workload], Task]]  # side name -> builder, in table order
    peer_name: Callable[[], str]
    per_token: bool  # whether tokens/s means something (a batch goes through the model)
    memory_runs: int = 2  # runs in the memory subprocess (2 for training: the second has optimizer state)
    has_plain: bool = False  # whether lorakit's side has fast paths `--plain` can switch off (side "plain")


REFERENCES = {"forward": ours.base_forward, "floor": ours.floor}

SCENARIOS: dict[str, Scenario] = {
    "forward": Scenario(
        "no-grad forward with an unmerged adapter on every linear, vs the frozen base",
        {"forward": ours.base_forward, "ours": ours.lorakit_forward, "peer": peers.peft_forward},
        peers.peft_name, per_token=True, memory_runs=1, has_plain=True,
    ),
    "floor": Scenario(
        "frozen base forward + backward to the inputs, no adapters: head and loss at supervised positions "
        "(lorakit, chunked) vs at every position (transformers' loss)",
        {"forward": ours.base_forward, "ours": ours.floor, "peer": peers.floor_full_logits},
        peers.transformers_name, per_token=True,
    ),
    "train-lora": Scenario(
        "LoRA training step (AdamW, grad clipping)",
        {**REFERENCES, "ours": ours.lorakit_train, "peer": peers.peft_train},
        peers.peft_name, per_token=True, has_plain=True,
    ),
    "train-qlora": Scenario(
        "QLoRA training step on an NF4 + double-quant base (AdamW, grad clipping); references are the fp32 base",
        {**REFERENCES, "ours": ours.lorakit_qlora_train, "peer": peers.peft_qlora_train},
        peers.peft_bnb_name, per_token=True, has_plain=True,
    ),
    "qlora": Scenario(
        "QLoRA step (NF4 + double quant) vs lorakit LoRA on the fp32 base vs PEFT + bitsandbytes; weight MiB",
        {**REFERENCES, "lora": ours.lorakit_train, "ours": ours.lorakit_qlora_train, "peer": peers.peft_qlora_train},
        peers.peft_bnb_name, per_token=True,
    ),
    "merge": Scenario(
        "merge_and_unload of an adapter on every linear (a fresh injected copy per run, untimed)",
        {"ours": ours.lorakit_merge, "peer": peers.peft_merge},
        peers.peft_name, per_token=False, memory_runs=1,
    ),
    "quant": Scenario(
        "NF4 (blocksize 64, double quant) quantize + dequantize of every linear weight but the head",
        {"ours": ours.lorakit_quant, "peer": peers.bnb_quant},
        peers.bnb_name, per_token=False, memory_runs=1,
    ),
}


def sides_of(name: str, w: Workload) -> dict[str, Callable[[Workload], Task]]:
    """The builders of scenario `name`; with `w.plain`, lorakit with LORAKIT_KERNELS=0 is measured too
    (side "plain"), so what the fast paths give is a ratio within one run. With `w.compile` (lorakit's
    blocks compiled), the floor is measured both ways ("floor" eager, "floor_compiled")."""
    scenario = SCENARIOS[name]
    sides = dict(scenario.sides)
    if w.plain and scenario.has_plain:
        ours_builder = sides["ours"]
        sides["plain"] = lambda w: ours_builder(dataclasses.replace(w, kernels=False))
    if w.compile and "floor" in sides:
        sides["floor"] = lambda w: ours.floor(dataclasses.replace(w, compile=False))
        sides["floor_compiled"] = ours.floor
    return sides
