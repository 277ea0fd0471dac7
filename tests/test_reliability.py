"""lorakit's promises beyond refusing bad input (docs/RELIABILITY.md): outputs replaced only when they are
lorakit's own, atomically; files readable as the umask says; a finished training never lost to a torn
metrics file; checkpoints of another run never resumed or pruned; NaN adapters refused at load."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from conftest import randomize_adapters
from lorakit.adapters.io import AdapterFileError, check_finite, read_adapter
from lorakit.cli import main
from lorakit.config import TrainConfig
from lorakit.export import write_merged_folder
from lorakit.models import load
from lorakit.outputs import MARK_FILE
from lorakit.train import run as run_module
from lorakit.train.fit import prune_checkpoints, run_identity


@pytest.fixture
def adapter(tiny_model_dir, tmp_path) -> Path:
    model, _ = load(str(tiny_model_dir))
    lorakit.inject(model, lorakit.LoraSpec(r=2, targets=["q_proj", "v_proj"]))
    randomize_adapters(model)
    return lorakit.save_adapter(model, tmp_path / "adapter")


def siblings(folder: Path) -> list[str]:
    """What is beside `folder` besides itself: temp folders an interrupted or failed write left."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def test_merge_replaces_its_own_output_and_only_that(adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(adapter), str(out)]) == 0
    assert json.loads((out / MARK_FILE).read_text())["kind"] == "merged"
    (out / "stale.txt").write_text("from the first merge")
    assert main(["merge", str(adapter), str(out)]) == 0  # a previous merged output: replaced whole
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert siblings(out) == []

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.txt").write_text("keep me")
    assert main(["export", "merged", str(adapter), str(victim)]) == 2
    assert (victim / "important.txt").read_text() == "keep me"
    assert main(["export", "merged", str(adapter), str(victim), "--overwrite"]) == 0
    assert not (victim / "important.txt").exists() and (victim / "config.json").is_file()
    assert "--overwrite" in capsys.readouterr().err


def test_a_failed_replacement_keeps_the_old_output(tiny_model_dir, tmp_path):
    """The new folder is built beside the old one; the old one goes only once the new one is complete."""
    model, tokenizer = load(str(tiny_model_dir))
    out = write_merged_folder(model, tokenizer, tmp_path / "merged")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_writer(m, folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_merged_folder(model, tokenizer, out, writer=broken_writer)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert siblings(out) == []


def test_gguf_output_replaces_only_a_gguf_lorakit_wrote(adapter, tmp_path):
    out = tmp_path / "a.gguf"
    assert main(["export", "gguf", "--adapter", str(adapter), str(out)]) == 0
    assert main(["export", "gguf", "--adapter", str(adapter), str(out)]) == 0  # its own: replaced
    other = tmp_path / "notes.gguf"
    other.write_text("my notes")
    assert main(["export", "gguf", "--adapter", str(adapter), str(other)]) == 2
    assert other.read_text() == "my notes"
    assert main(["export", "gguf", "--adapter", str(adapter), str(other), "--overwrite"]) == 0
    assert other.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_follow_the_umask(adapter, tiny_model_dir, jsonl, tmp_path, umask):
    """Temp-file writes (adapter, results, checkpoints, merged folders) get open()/mkdir()'s modes, not 0600/0700."""
    old = os.umask(umask)
    try:
        assert main(["train", f"base={tiny_model_dir}", f"dataset={jsonl}", f"output_dir={tmp_path / 'run'}",
                     "max_steps=2", "checkpoint_every=2", "eval=false"]) == 0
        assert main(["merge", str(adapter), str(tmp_path / "merged")]) == 0
    finally:
        os.umask(old)
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    for path in (tmp_path / "run" / "adapter" / "adapter_model.safetensors", tmp_path / "run" / "results.json",
                 tmp_path / "run" / "adapter" / "adapter_config.json", tmp_path / "merged" / MARK_FILE):
        assert path.stat().st_mode & 0o777 == file_mode, path
    for path in (tmp_path / "merged", tmp_path / "run" / "checkpoint-2"):
        assert path.stat().st_mode & 0o777 == dir_mode, path


def test_a_torn_metrics_file_costs_the_plot_not_the_adapter(tiny_model_dir, jsonl, tmp_path, monkeypatch, capsys):
    """Two runs writing into one output_dir, or a torn last line: the adapter and results.json are saved,
    the plot is skipped with a warning naming the line."""
    real_fit = run_module.fit

    def fit_then_tear(*args, **kwargs):
        result = real_fit(*args, **kwargs)
        with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
            f.write('{"step": 3, "lo')
        return result

    monkeypatch.setattr(run_module, "fit", fit_then_tear)
    assert main(["train", f"base={tiny_model_dir}", f"dataset={jsonl}", f"output_dir={tmp_path / 'run'}",
                 "max_steps=2", "eval=false"]) == 0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 2
    printed = capsys.readouterr().out
    assert "warning: no loss.png:" in printed and "metrics.jsonl:3: not a JSON record" in printed
    assert not (tmp_path / "run" / "loss.png").exists()


def fake_checkpoint(out: Path, step: int, cfg: TrainConfig) -> Path:
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.pt").write_bytes(b"state")
    (path / "run.json").write_text(json.dumps(run_identity(cfg)))
    return path


def test_pruning_deletes_only_this_runs_checkpoints(tmp_path):
    mine, theirs = TrainConfig(seed=0), TrainConfig(seed=1)
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step, mine)
    for step in (4, 5):
        fake_checkpoint(tmp_path, step, theirs)
    prune_checkpoints(tmp_path, 1, run_identity(mine))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]


def test_resume_auto_never_resumes_another_run(tiny_model_dir, jsonl, tmp_path, capsys):
    common = [f"base={tiny_model_dir}", f"dataset={jsonl}", f"output_dir={tmp_path / 'run'}", "max_steps=4",
              "checkpoint_every=2", "eval=false"]
    assert main(["train", *common]) == 0
    saved = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert main(["train", *common, "resume=auto", "lora.r=4"]) == 2
    assert "checkpoint-4 is another run's checkpoint: lora.r is 8 there, 4 here" in capsys.readouterr().err
    assert main(["train", *common, "max_steps=6"]) == 2  # resume unset: the old run's checkpoints are kept
    assert "holds checkpoints of an earlier run" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == saved
    assert main(["train", *common, "resume=auto", "max_steps=6", "lr=0.001"]) == 0  # the same run, longer
    assert "resumed from" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_non_finite_adapters_are_refused_when_read(adapter, tiny_model_dir):
    assert check_finite(read_adapter(adapter)) is None
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(k for k in tensors if k.endswith("lora_A.weight"))[1]
    tensors[key][1, 2] = float("-inf")
    save_file(tensors, weights, metadata={"format": "pt"})
    module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
    message = rf"adapter_model\.safetensors: tensor {module}\.lora_A holds 1 NaN/Inf value of"
    with pytest.raises(AdapterFileError, match=message):
        read_adapter(adapter)
    model, _ = load(str(tiny_model_dir))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(AdapterFileError, match=message):
        lorakit.load_adapter(model, adapter)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the model untouched


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"lorakit {lorakit.__version__}"
