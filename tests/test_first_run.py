"""The first hour with the CLI: what `lorakit train` prints at the end, where it writes by default, optional
packages refused when the config is read, `eval` saying what it scored, `serve` on a missing store and its
--help, and quiet output (no dependency deprecation notices the user cannot act on)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.config import load_train_config

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_train_prints_where_things_went_and_the_next_commands(tiny_model_dir, jsonl, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [".venv/bin/lorakit"])  # as the user called it
    assert main(["train", f"base={tiny_model_dir}", f"dataset={jsonl.name}", "max_steps=2", "eval=false"]) == 0
    printed = capsys.readouterr().out.splitlines()
    run = Path("runs/train")  # the default output_dir: runs/ + the dataset's name
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and not Path("runs/demo").exists()
    assert "  adapter  runs/train/adapter/" in printed
    assert "  metrics  runs/train/metrics.jsonl, runs/train/results.json" in printed
    assert "  plot     runs/train/loss.png" in printed and (run / "loss.png").is_file()
    after = printed[printed.index("next:") + 1:]
    assert after == ["  .venv/bin/lorakit eval runs/train/adapter --dataset train.jsonl",
                     "  .venv/bin/lorakit generate --adapter runs/train/adapter 'YOUR PROMPT'",
                     "  .venv/bin/lorakit serve --adapters train=runs/train/adapter"]
    monkeypatch.setattr(sys, "argv", ["lorakit"])
    assert main(after[0].split()[1:] + ["--max-new-tokens", "2"]) == 0  # the printed command runs
    assert "(8 examples: every row of train.jsonl, training rows included" in capsys.readouterr().out


def test_eval_scores_the_runs_own_held_out_rows(tiny_model_dir, jsonl, tmp_path, capsys, monkeypatch):
    """`lorakit eval ADAPTER` without --dataset: the held-out split of the run that saved it (val_size, seed),
    the same rows the run scored at its end; the printed next step is that command."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lorakit"])
    assert main(["train", f"base={tiny_model_dir}", f"dataset={jsonl.name}", "val_size=3", "seed=5", "max_steps=30",
                 "lr=0.02", "max_new_tokens=4", "output_dir=run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[printed.index("next:") + 1] == "  lorakit eval run/adapter"
    results = json.loads(Path("run/results.json").read_text())
    assert main(["eval", "run/adapter", "--max-new-tokens", "4"]) == 0
    assert (f"exact match: {results['exact_match_after']:.1%} (3 examples: the held-out rows of the run in run)"
            in capsys.readouterr().out)


def test_default_output_dir_keeps_the_demo_apart():
    assert load_train_config(None, []).output_dir == "runs/demo"
    assert load_train_config(None, ["dataset=data/chats.jsonl"]).output_dir == "runs/chats"
    assert load_train_config(None, ["dataset=[{path: my/sql, weight: 2}, b.csv]"]).output_dir == "runs/sql"
    assert load_train_config(None, ["dataset=data/chats.jsonl", "output_dir=out"]).output_dir == "out"


def test_optional_packages_are_refused_when_the_config_is_read(monkeypatch, capsys):
    import lorakit.models

    monkeypatch.setattr(lorakit.models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: find_spec gives None
    assert main(["train", "tensorboard=true"]) == 2
    err = capsys.readouterr().err
    assert "lorakit: error: overrides: tensorboard: true needs the tensorboard package" in err
    assert ".venv/bin/python -m pip install tensorboard" in err and "-e '.[tensorboard]'" in err
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    assert main(["train", "dataset=data/rows.parquet"]) == 2
    err = capsys.readouterr().err
    assert "data/rows.parquet: reading Parquet needs the pyarrow package" in err and "pip install pyarrow" in err


def test_serve_refuses_a_missing_store_before_loading(tmp_path, capsys, monkeypatch):
    import lorakit.cli

    monkeypatch.setattr(lorakit.cli, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["serve", "--store", str(tmp_path / "nope")]) == 2
    assert f"--store {tmp_path / 'nope'}: no such folder (create it first: mkdir -p" in capsys.readouterr().err


def test_serve_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in ("(default: 512)", "(default: 2048)", "(default: 4096)", "(default: 256)", "(default: 64)",
                    "(default: 127.0.0.1)", "(default: 8000)", "(default: 1048576)", "(default: default)"):
        assert default in text


def run_quiet_check(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=SRC, PYTHONWARNINGS="default")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_qlora_training_prints_no_future_warning(tiny_model_dir, jsonl, tmp_path):
    err = run_quiet_check(f"""
import sys
from lorakit.cli import main
sys.exit(main(["train", "base={tiny_model_dir}", "dataset={jsonl}", "eval_dataset={jsonl}", "quant={{}}",
               "optim=adamw8bit", "max_steps=2", "max_new_tokens=2", "output_dir={tmp_path / 'run'}"]))
""")
    assert "train:" in err and "loss=" in err  # progress stays
    assert "FutureWarning" not in err and "deprecated" not in err, err


def test_the_two_transformers_notices_are_dropped_and_only_those():
    """Fresh processes (transformers logs `past_key_values` once per process): with lorakit's filter the two
    notices are gone, without it both appear; another warning of the same category still shows."""
    trigger = """
import logging, warnings
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils.generic import _rename_kwargs_for_bc
model = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                     num_attention_heads=1, num_key_value_heads=1))
model.is_gradient_checkpointing
_rename_kwargs_for_bc({"past_key_values": None})
warnings.warn("another FutureWarning", FutureWarning)
"""
    loud = run_quiet_check(trigger)
    assert "`is_gradient_checkpointing` is deprecated" in loud and "`past_key_values`/`cache_params`" in loud
    quiet = run_quiet_check("from lorakit.cli import quiet_dependencies; quiet_dependencies()\n" + trigger)
    assert "is_gradient_checkpointing" not in quiet and "past_key_values" not in quiet
    assert "another FutureWarning" in quiet
