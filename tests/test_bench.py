"""`lorakit bench` in quick mode (tiny random model): the records' schema and arithmetic, never timings."""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

from lorakit.cli import main
from lorakit_bench.peers import need
from lorakit_bench.run import DEFAULT_SCENARIOS, run_bench
from lorakit_bench.workload import Workload, load_base, resolve_model

SIDE_KEYS = {"name", "seconds"}
TOP_KEYS = {"scenario", "ours", "peer", "ratios", "reference", "config", "env"}


def check_record(record: dict) -> None:
    assert set(record) >= TOP_KEYS
    for side in ("ours", "peer"):
        assert set(record[side]) >= SIDE_KEYS and record[side]["seconds"] > 0
    assert record["ours"]["name"] == "lorakit" and record["peer"]["name"]
    shared = [k for k in record["ours"] if k != "name" and k in record["peer"]]
    assert set(record["ratios"]) == set(shared) and "seconds" in shared
    for k, ratio in record["ratios"].items():
        assert ratio == record["ours"][k] / record["peer"][k], k
    assert record["config"]["threads"] == record["env"]["threads"] == 1
    assert {"torch", "date", "loadavg_1m_before"} <= set(record["env"])


@pytest.fixture(scope="module")
def quick_records(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("bench") / "bench.jsonl"
    printed: list[str] = []
    returned = run_bench(reps=1, warmup=1, threads=1, json_out=out, quick=True, memory=False, log=printed.append)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == returned and len(printed) == len(records)
    return records


def test_one_record_per_scenario_with_consistent_ratios(quick_records):
    assert [r["scenario"] for r in quick_records] == list(DEFAULT_SCENARIOS)
    for record in quick_records:
        check_record(record)


def test_training_tables_carry_forward_and_floor_of_the_same_batch(quick_records):
    for record in (r for r in quick_records if r["scenario"].startswith("train-")):
        assert set(record["reference"]) == {"forward", "floor"}
        floor = record["reference"]["floor"]["seconds"]
        for side in ("ours", "peer"):
            assert record[side]["over_floor"] == record[side]["seconds"] / floor
            assert record[side]["tokens_per_s"] == record["config"]["batch"] * record["config"]["seq"] / \
                record[side]["seconds"]
        # a fresh adapter (B = 0) changes nothing: both sides' first loss is the base's, by the same definition
        assert record["ours"]["first_loss"] == pytest.approx(record["peer"]["first_loss"], rel=1e-5)


def test_quant_and_merge_report_their_own_metrics(quick_records):
    by_name = {r["scenario"]: r for r in quick_records}
    assert {"quantize_s", "dequantize_s"} <= set(by_name["quant"]["ratios"])
    assert "tokens_per_s" not in by_name["merge"]["ours"]


def test_peak_rss_is_measured_per_side_in_its_own_process(tmp_path):
    (record,) = run_bench(["merge"], reps=1, warmup=0, threads=1, quick=True, log=lambda s: None)
    check_record(record)
    for side in ("ours", "peer"):
        assert record[side]["peak_rss"] > 0 and record[side]["setup_peak_rss"] > 0
    assert record["ratios"]["peak_rss"] == record["ours"]["peak_rss"] / record["peer"]["peak_rss"]


def test_cli_runs_a_scenario_and_rejects_unknown_ones(tmp_path, capsys):
    out = tmp_path / "q.jsonl"
    assert main(["bench", "quant", "--quick", "--no-memory", "--reps", "1", "--threads", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["scenario"] == "quant"
    assert "lorakit / bitsandbytes" in capsys.readouterr().out
    assert main(["bench", "train", "--quick"]) == 2
    assert "unknown scenario" in capsys.readouterr().err


def test_a_missing_peer_says_what_to_install(monkeypatch):
    real = importlib.import_module

    def fake(name, *args):
        if name == "peft":
            raise ImportError("No module named 'peft'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(ImportError, match="pip install peft"):
        need("peft")


def test_plain_side_keeps_the_loss_and_restores_the_fast_paths(monkeypatch):
    monkeypatch.delenv("LORAKIT_KERNELS", raising=False)
    (record,) = run_bench(["train-qlora"], reps=1, warmup=1, threads=1, quick=True, memory=False, plain=True,
                          log=lambda s: None)
    check_record(record)
    assert set(record["reference"]) == {"forward", "floor", "plain"}
    plain = record["reference"]["plain"]  # lorakit with LORAKIT_KERNELS=0, measured in the same run
    assert plain["over_floor"] == plain["seconds"] / record["reference"]["floor"]["seconds"]
    for side in (record["ours"], plain):
        assert side["first_loss"] == pytest.approx(record["peer"]["first_loss"], rel=1e-5)
    assert "LORAKIT_KERNELS" not in os.environ  # the sides' switching does not leak out of the bench


def test_qlora_scenario_reports_weight_memory_against_the_fp32_lora_base():
    (record,) = run_bench(["qlora"], reps=1, warmup=1, threads=1, quick=True, memory=False, log=lambda s: None)
    check_record(record)
    lora, ours = record["reference"]["lora"], record["ours"]
    # the tiny model's linears in fp32 vs NF4 + double quant: 4 bytes vs about 4.127 / 8 per weight
    model = load_base(resolve_model(Workload(model="tiny")))
    linear_numel = sum(m.weight.numel() for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    assert lora["linear_weight_mib"] * (1 << 20) == 4 * linear_numel
    # the same bytes as bitsandbytes' layout (4-bit codes + absmax codes + nested absmax, code books, state JSON)
    assert ours["linear_weight_mib"] == pytest.approx(record["peer"]["linear_weight_mib"], rel=1e-3)
    assert ours["linear_weight_mib"] * (1 << 20) > linear_numel / 2 * (1 + 2 / 64)  # at least codes + absmax codes
    assert record["vs_lora"]["linear_weight_mib"] == ours["linear_weight_mib"] / lora["linear_weight_mib"]
    assert ours["first_loss"] == pytest.approx(record["peer"]["first_loss"], rel=1e-5)


def test_checkpointing_is_set_on_both_training_sides_and_keeps_the_loss(monkeypatch):
    import transformers

    enabled = []
    # transformers 5: lorakit calls activation_checkpointing_enable, PEFT the deprecated
    # gradient_checkpointing_enable, which calls it in turn: each model counts once
    real = transformers.PreTrainedModel.activation_checkpointing_enable
    monkeypatch.setattr(transformers.PreTrainedModel, "activation_checkpointing_enable",
                        lambda self, *a, **k: enabled.append(type(self).__name__) or real(self, *a, **k))
    (record,) = run_bench(["train-qlora"], reps=1, warmup=1, threads=1, quick=True, memory=False,
                          checkpointing=True, log=lambda s: None)
    assert len(enabled) == 2  # lorakit's and PEFT's model; not the references
    assert record["config"]["checkpointing"] is True
    assert record["ours"]["first_loss"] == pytest.approx(record["peer"]["first_loss"], rel=1e-5)


@pytest.mark.slow  # compiling the tiny model's blocks takes tens of seconds on the CPU
def test_compiled_side_and_floor_keep_the_loss():
    (record,) = run_bench(["train-lora"], reps=1, warmup=1, threads=1, quick=True, memory=False, compile=True,
                          log=lambda s: None)
    check_record(record)
    ref = record["reference"]
    assert set(ref) == {"forward", "floor", "floor_compiled"}
    assert ref["floor_compiled"]["first_loss"] == pytest.approx(ref["floor"]["first_loss"], rel=1e-5)
    assert record["ours"]["first_loss"] == pytest.approx(record["peer"]["first_loss"], rel=1e-5)
