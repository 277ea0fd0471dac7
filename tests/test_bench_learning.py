"""`lorakit bench learning`: --quick end to end, what the records carry, resume, and the summary statistics."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from lorakit_bench import learning


def args_for(tmp_path, *settings: str, json_name: str = "learning.jsonl") -> argparse.Namespace:
    items = [f"plot={tmp_path / 'curves.png'}", f"table={tmp_path / 'table.md'}", *settings]
    return argparse.Namespace(reps=1, warmup=0, threads=1, json=str(tmp_path / json_name), quick=True,
                              no_memory=True, set=items)


def test_quick_end_to_end_records_carry_the_table(tmp_path, capsys):
    records = learning.run(args_for(tmp_path, "tasks=demo", "seeds=0", "sweep=lora", "sweep_lrs=8e-3"))
    written = [json.loads(line) for line in (tmp_path / "learning.jsonl").read_text().splitlines()]
    assert written == records
    by_method = {r["method"]: r for r in records if r["lr"] == learning.METHODS[r["method"]]["lr"]}
    assert list(by_method) == list(learning.METHODS)  # every method, in the planned order
    assert [(r["method"], r["lr"]) for r in records[len(learning.METHODS):]] == [("lora", 8e-3)]
    for r in records:
        # what the docs table shows: label, lr, trainable and total params, the curve, step time; and the run's key
        for key in ("task", "method", "label", "lr", "seed", "trainable_params", "total_params", "eval_steps",
                    "exact_match_curve", "exact_match", "step_s", "eval_s", "step0_from", "config", "env"):
            assert key in r, key
        assert r["eval_steps"] == [0, 2, 4] and len(r["exact_match_curve"]) == 3
        assert r["exact_match"] == r["exact_match_curve"][-1]
        assert all(0 <= v <= 1 for v in r["exact_match_curve"]) and r["step_s"] > 0
        assert r["config"] == {"steps": 4, "evals": [0, 2, 4], "n_train": 16, "n_eval": 4, "batch": 4, "model": "tiny"}
        assert len(r["losses"]) == 4
    # step 0 of the base: measured by the first run, shared by the rest; PiSSA and QLoRA measure their own
    assert by_method["full"]["step0_from"] == "measured"
    own = {m for m, r in by_method.items() if r["step0_from"] == "measured"}
    assert own == {"full", "pissa", "qlora"}
    assert by_method["qlora"]["trainable_params"] == by_method["lora"]["trainable_params"]
    assert by_method["lora_r64"]["trainable_params"] == 64 * by_method["lora_r1"]["trainable_params"]
    assert by_method["full"]["trainable_params"] == by_method["full"]["total_params"]
    # AdaLoRA reaches LoRA r=8's final budget
    assert by_method["adalora"]["adalora_total_rank"] == by_method["adalora"]["adalora_target_rank"]
    printed = capsys.readouterr().out
    table = (tmp_path / "table.md").read_text()
    assert table in printed
    for r in records:
        assert f"| {r['label']} |" in table
    assert "| demo | LoRA r=8 | 0.008 | 1 | " in table
    for png in ("curves.png", "curves-lr.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_skips_finished_runs(tmp_path, monkeypatch):
    settings = ("tasks=demo", "seeds=0,1", "methods=lora,bitfit,pissa", "sweep=")
    first = learning.run(args_for(tmp_path, *settings))
    assert len(first) == 6
    path = tmp_path / "learning.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:4]) + "\n" + lines[4][:25])  # the last two runs lost, one line torn
    trained = []
    real = learning.train_run
    monkeypatch.setattr(learning, "train_run", lambda request: trained.append(request) or real(request))
    again = learning.run(args_for(tmp_path, *settings))
    assert [(r["method"], r["seed"]) for r in trained] == [("bitfit", 1), ("pissa", 1)]  # only the missing ones
    assert trained[0]["step0"] == first[3]["exact_match_curve"][0]  # the base's step 0, measured by LoRA seed 1
    assert trained[1]["step0"] is None  # PiSSA measures its own
    assert [learning.run_key(r) for r in again] == [learning.run_key(r) for r in first]
    assert again[:4] == first[:4]  # read back, not retrained

    def never(request):
        raise AssertionError(f"retrained {request}")

    monkeypatch.setattr(learning, "train_run", never)
    assert learning.run(args_for(tmp_path, *settings)) == again
    # max_runs=0 reports only: it reads the file another invocation may be appending to, and leaves it alone
    with open(path, "a") as f:
        f.write('{"suite": "learn')  # a record being written
    before = path.read_text()
    assert learning.run(args_for(tmp_path, *settings, "max_runs=0")) == again
    assert path.read_text() == before
    # max_runs=N: at most N of the runs not yet done
    more = ("tasks=demo", "seeds=0,1,2", "methods=lora,bitfit,pissa", "sweep=", "max_runs=1")
    monkeypatch.setattr(learning, "train_run", lambda request: trained.append(request) or real(request))
    assert len(learning.run(args_for(tmp_path, *more))) == 7
    assert [(r["method"], r["seed"]) for r in trained[2:]] == [("lora", 2)]
    with pytest.raises(ValueError, match="steps=4, not 6"):
        learning.run(args_for(tmp_path, *settings, "steps=6", "evals=0,6"))


def test_summary_mean_and_spread_against_hand_computed_values():
    def record(method, seed, curve, lr=2e-3):
        return {"task": "demo", "method": method, "lr": lr, "seed": seed, "label": method, "eval_steps": [0, 8],
                "exact_match_curve": curve, "trainable_params": 10, "total_params": 100, "step_s": 1.0 + seed}

    records = [record("lora", 0, [0.0, 0.2]), record("lora", 1, [0.0, 0.4]), record("lora", 2, [0.0, 0.9]),
               record("dora", 0, [0.1, 0.5])]
    summary = learning.summarize(records)
    lora = summary[("demo", "lora", 2e-3)]
    # by hand: mean (0.2 + 0.4 + 0.9) / 3 = 0.5; deviations -0.3, -0.1, 0.4 -> (0.09 + 0.01 + 0.16) / 2 = 0.13
    assert lora["mean"] == pytest.approx([0.0, 0.5])
    assert lora["sd"] == pytest.approx([0.0, math.sqrt(0.13)])
    assert (lora["min"], lora["max"]) == ([0.0, 0.2], [0.0, 0.9])
    assert lora["seeds"] == [0, 1, 2] and lora["step_s"] == 2.0
    dora = summary[("demo", "dora", 2e-3)]
    assert dora["mean"] == [0.1, 0.5] and dora["sd"] == [None, None]  # one seed: no spread
    assert learning.cell(0.5, math.sqrt(0.13)) == "50 ± 36" and learning.cell(0.5, None) == "50"


def test_plan_order_and_settings_checks():
    args = argparse.Namespace(quick=False, set=["methods=lora,dora", "seeds=0,1", "sweep=lora", "sweep_lrs=5e-4,2e-3"])
    plan = learning.planned_runs(learning.settings(args))
    lr = learning.METHODS["lora"]["lr"]
    assert plan == [("demo", "lora", lr, 0), ("demo", "dora", lr, 0), ("json", "lora", lr, 0),
                    ("json", "dora", lr, 0), ("demo", "lora", lr, 1), ("demo", "dora", lr, 1),
                    ("json", "lora", lr, 1), ("json", "dora", lr, 1),
                    ("demo", "lora", 5e-4, 0), ("json", "lora", 5e-4, 0), ("demo", "lora", 5e-4, 1),
                    ("json", "lora", 5e-4, 1)]  # seed 0 first, then seed 1, the sweep last (its own lr not again)
    for bad, message in ((["methods=lora,nope"], "unknown"), (["tasks=nope"], "unknown"),
                         (["evals=0,8"], "evals must rise")):
        with pytest.raises(ValueError, match=message):
            learning.settings(argparse.Namespace(quick=False, set=bad))


def test_jobs_run_side_by_side_and_match_one_at_a_time(tmp_path):
    """jobs=2: two runs at once, each in its own process; every planned run recorded once, with the same
    figures as the runs made one after another (the requests do not get mixed up between the job threads)."""
    settings = ("tasks=demo", "seeds=0,1", "methods=lora,bitfit,pissa", "sweep=")
    serial = learning.run(args_for(tmp_path, *settings, json_name="serial.jsonl"))
    side = learning.run(args_for(tmp_path, *settings, "jobs=2", json_name="side.jsonl"))
    lines = [json.loads(line) for line in (tmp_path / "side.jsonl").read_text().splitlines()]
    keys = [learning.run_key(r) for r in lines]
    assert sorted(keys) == sorted(learning.run_key(r) for r in serial) and len(set(keys)) == len(keys) == 6
    assert {r["env"]["jobs"] for r in lines} == {2}
    by_key = {learning.run_key(r): r for r in side}
    for r in serial:
        twin = by_key[learning.run_key(r)]
        assert twin["exact_match_curve"] == r["exact_match_curve"], learning.run_key(r)
        assert twin["losses"] == pytest.approx(r["losses"], rel=1e-5), learning.run_key(r)
    with pytest.raises(ValueError, match="jobs=0"):
        learning.run(args_for(tmp_path, *settings, "jobs=0", json_name="never.jsonl"))
