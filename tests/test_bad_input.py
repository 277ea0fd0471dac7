"""The bad-input corpus: data files, configs and overrides, adapter folders and output paths that a
careless or hostile user sends to the command line. ONE table test drives every case through
`lorakit.cli.main` and asserts: exit code 2, `lorakit: error: ...` naming the file/line/field, no
traceback, and no file created, changed or deleted anywhere in the case's folder or the shared ones
(the tiny model, the adapters, a finished run with its checkpoints).

A case is (name, files to create in its own folder, argv, expected message fragments); `{case}`,
`{model}`, `{other_model}`, `{adapter}`, `{nan_adapter}`, `{inf_adapter}`, `{run}` in argv are paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from conftest import randomize_adapters, tiny_llama, tiny_tokenizer
from lorakit.cli import main
from lorakit.models import load

GOOD_ROWS = "".join(json.dumps({"prompt": f"say {w}", "completion": w}) + "\n" for w in ("cat", "dog", "sun", "sky"))


@dataclass
class Case:
    name: str
    argv: list[str]
    expect: list[str]  # fragments of stderr, in any order
    files: dict[str, str | bytes] = field(default_factory=dict)  # relative path -> content, in the case folder


def train(*overrides: str, dataset: str = "{case}/rows.jsonl") -> list[str]:
    return ["train", "base={model}", f"dataset={dataset}", "output_dir={case}/out", "max_steps=2", "eval=false",
            "lora.r=2", *overrides]


ROWS = {"rows.jsonl": GOOD_ROWS}
PEFT_CONFIG = json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]})

CASES = [
    # ---------------------------------------------------------------- configs and overrides
    Case("lr-not-a-number", train("lr=abc"), ["lr: expected a number or null, got 'abc'"], ROWS),
    Case("lr-negative", train("lr=-1"), ["lr must be a positive number, got -1"], ROWS),
    Case("max-steps-negative", train("max_steps=-3"), ["max_steps must be a positive integer, got -3"], ROWS),
    Case("max-steps-fraction", train("max_steps=1.5"), ["max_steps: expected an integer or null, got 1.5"], ROWS),
    Case("grad-accum-zero", train("grad_accum=0"), ["grad_accum must be a positive integer, got 0"], ROWS),
    Case("batch-size-zero", train("batch_size=0"), ["batch_size must be a positive integer, got 0"], ROWS),
    Case("keep-checkpoints-zero", train("keep_checkpoints=0"), ["keep_checkpoints must be a positive integer"], ROWS),
    Case("epochs-negative", train("max_steps=null", "epochs=-1"), ["epochs must be a positive number"], ROWS),
    Case("lora-not-a-section", train("lora=5"), ["lora: expected a section", "got 5"], ROWS),
    Case("lora-r-string", train("lora.r=eight"), ["section 'lora': r: expected an integer, got 'eight'"], ROWS),
    Case("lora-targets-number", train("lora.targets=5"), ["targets: expected a string or a list or null"], ROWS),
    Case("output-dir-number", train("output_dir=5"), ["output_dir: expected a string or null, got 5"], ROWS),
    Case("dataset-number", train(dataset="5"), ["dataset: expected a string or a list, got 5"]),
    Case("eval-not-a-bool", train("eval=maybe"), ["eval: expected true or false, got 'maybe'"], ROWS),
    Case("override-broken-yaml", train("lora.targets=[q_proj"), ["override 'lora.targets=[q_proj': invalid YAML"],
         ROWS),
    Case("override-without-value", train("max_steps"), ["override 'max_steps' is not of the form key=value"], ROWS),
    Case("unknown-key", train("lora.rr=4"), ["unknown key 'rr' (did you mean 'r'?)"], ROWS),
    Case("yaml-number-as-text", ["train", "{case}/c.yaml"], ["c.yaml: lr: expected a number or null, got 'abc'"],
         {"c.yaml": "lr: abc\n"}),
    Case("yaml-broken", ["train", "{case}/c.yaml"], ["c.yaml: invalid YAML"], {"c.yaml": "lr: [1, 2\n"}),
    Case("yaml-not-a-mapping", ["train", "{case}/c.yaml"], ["c.yaml: top level must be a mapping"],
         {"c.yaml": "- lr\n- 2\n"}),
    Case("yaml-missing", ["train", "{case}/none.yaml"], ["cannot read config", "none.yaml"]),
    Case("nproc-zero", ["train", "--nproc", "0"], ["--nproc must be at least 1, got 0"]),
    Case("layers-out-of-range", train("lora.layers=[99]"),
         ["lora.layers: layer index 99 is out of range (the model has 2 layers"], ROWS),
    # ---------------------------------------------------------------- output_dir and checkpoints
    Case("output-dir-is-a-file", train(), ["output_dir", "out is a file; it must be a folder"],
         {**ROWS, "out": "my notes\n"}),
    Case("output-dir-inside-a-file", train("output_dir={case}/notes.txt/run"),
         ["is inside", "notes.txt, which is a file"],
         {**ROWS, "notes.txt": "my notes\n"}),
    Case("output-dir-holds-another-run", train("output_dir={run}"),
         ["output_dir", "holds checkpoints of an earlier run (checkpoint-2)", "resume=auto"], ROWS),
    Case("resume-auto-other-seed",
         train("output_dir={run}", "resume=auto", "seed=1", "batch_size=2", dataset="{run}/rows.jsonl"),
         ["checkpoint-2 is another run's checkpoint: seed is 0 there, 1 here"]),
    Case("resume-other-dataset", train("output_dir={run}", "resume=auto", "batch_size=2"),
         ["another run's checkpoint: dataset is"],
         ROWS),
    Case("resume-changed-rank",
         train("resume={run}/checkpoint-2", "lora.r=4", "batch_size=2", dataset="{run}/rows.jsonl"),
         ["another run's checkpoint: lora.r is 2 there, 4 here"]),
    Case("resume-missing", train("resume={case}/nope"), ["resume=", "trainer_state.pt does not exist"], ROWS),
    # ---------------------------------------------------------------- data files
    Case("csv-extra-field", train(dataset="{case}/rows.csv"), ["rows.csv:3: 4 fields, but the header has 2"],
         {"rows.csv": "prompt,completion\nsay cat,cat\nSay the numbers,one, two, three\n"}),
    Case("csv-missing-field", train(dataset="{case}/rows.csv"), ["rows.csv:2: 1 field, but the header has 2"],
         {"rows.csv": "prompt,completion\nsay cat\n"}),
    Case("csv-repeated-column", train(dataset="{case}/rows.csv"), ["rows.csv:1: the header", "repeated column"],
         {"rows.csv": "prompt,prompt\na,b\n"}),
    Case("jsonl-invalid-line", train(dataset="{case}/rows.jsonl"), ["rows.jsonl:5: invalid JSON"],
         {"rows.jsonl": GOOD_ROWS + '{"prompt": "say', }),
    Case("jsonl-not-an-object", train(dataset="{case}/rows.jsonl"), ["rows.jsonl:1: expected an object of fields"],
         {"rows.jsonl": "[1, 2]\n"}),
    Case("jsonl-unknown-format", train(dataset="{case}/rows.jsonl"), ["rows.jsonl:1: cannot tell the format"],
         {"rows.jsonl": '{"question": "a", "answer": "b"}\n'}),
    Case("jsonl-completion-number", train(dataset="{case}/rows.jsonl"),
         ["rows.jsonl:2: field 'completion' is not a string (int)"],
         {"rows.jsonl": '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 5}\n'}),
    Case("jsonl-no-assistant-turn", train(dataset="{case}/rows.jsonl"),
         ["rows.jsonl:1: the conversation has no assistant"],
         {"rows.jsonl": '{"messages": [{"role": "user", "content": "hi"}]}\n'}),
    Case("json-not-a-list", train(dataset="{case}/rows.json"), ["rows.json: expected a JSON list of rows, got dict"],
         {"rows.json": '{"prompt": "a", "completion": "b"}'}),
    Case("not-utf8", train(dataset="{case}/rows.jsonl"), ["rows.jsonl: not UTF-8 text"],
         {"rows.jsonl": b'{"prompt": "\xff\xfe", "completion": "b"}\n'}),
    Case("empty-file", train(dataset="{case}/rows.jsonl"), ["rows.jsonl: the dataset is empty"], {"rows.jsonl": ""}),
    Case("unsupported-suffix", train(dataset="{case}/rows.txt"), ["rows.txt: unsupported dataset file type '.txt'"],
         {"rows.txt": "say cat\n"}),
    Case("dataset-missing", train(dataset="{case}/none.jsonl"), ["dataset file", "none.jsonl does not exist"]),
    Case("dataset-empty-folder", train(dataset="{case}/data"), ["dataset folder", "holds no"],
         {"data/README.md": "nothing here\n"}),
    Case("dataset-empty-list", train(dataset="[]"), ["dataset is an empty list"]),
    Case("chat-template-unknown-name", train("chat_template=chatlm"), ["chat_template must be one of ['chatml']"],
         ROWS),
    Case("dataset-negative-weight", train(dataset="[{{path: {case}/rows.jsonl, weight: -1}}]"),
         ["dataset entry 0: needs a 'path' and a positive 'weight'"], ROWS),
    Case("eval-dataset-bad-csv", ["eval", "{adapter}", "--dataset", "{case}/rows.csv"],
         ["rows.csv:2: 3 fields, but the header has 2"], {"rows.csv": "prompt,completion\nsay a,b,c\n"}),
    # ---------------------------------------------------------------- adapter folders
    Case("eval-max-new-tokens-zero", ["eval", "{adapter}", "--max-new-tokens", "0"],
         ["argument --max-new-tokens: must be at least 1, got 0"]),
    Case("generate-max-new-tokens-text", ["generate", "--max-new-tokens", "many", "hi"],
         ["argument --max-new-tokens: expected an integer, got 'many'"]),
    Case("adapter-is-a-file", ["generate", "--adapter", "{case}/adapter.txt", "hi"],
         ["adapter.txt is a file, expected an adapter folder"], {"adapter.txt": "x"}),
    Case("adapter-missing", ["eval", "{case}/nope"], ["adapter folder", "nope does not exist"]),
    Case("adapter-without-config", ["eval", "{case}/a"], ["a/adapter_config.json is missing"],
         {"a/adapter_model.safetensors": b"x"}),
    Case("adapter-config-invalid-json", ["eval", "{case}/a"], ["adapter_config.json: invalid JSON at line 1"],
         {"a/adapter_config.json": "{r: 2", "a/adapter_model.safetensors": b"x"}),
    Case("adapter-config-other-peft-type", ["eval", "{case}/a"], ["peft_type 'PREFIX_TUNING' is not LORA"],
         {"a/adapter_config.json": json.dumps({"peft_type": "PREFIX_TUNING"}), "a/adapter_model.safetensors": b"x"}),
    Case("adapter-weights-garbage", ["eval", "{case}/a"], ["adapter_model.safetensors is not a readable safetensors"],
         {"a/adapter_config.json": PEFT_CONFIG, "a/adapter_model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}"}),
    Case("adapter-pickle-only", ["eval", "{case}/a"], ["only safetensors is loaded"],
         {"a/adapter_config.json": PEFT_CONFIG, "a/adapter_model.bin": b"\x80\x04pickle"}),
    Case("adapter-nan-generate", ["generate", "--adapter", "{nan_adapter}", "hi"],
         ["adapter_model.safetensors: tensor model.layers.0.self_attn.q_proj.lora_B holds 1 NaN/Inf value"]),
    Case("adapter-nan-eval", ["eval", "{nan_adapter}", "--dataset", "{case}/rows.jsonl"], ["NaN/Inf", "lora_B"], ROWS),
    Case("adapter-inf-merge", ["merge", "{inf_adapter}", "{case}/merged"], ["lora_A holds", "NaN/Inf"]),
    Case("adapter-inf-export", ["export", "gguf", "--adapter", "{inf_adapter}", "{case}/a.gguf"], ["NaN/Inf"]),
    Case("adapter-other-base", ["generate", "--adapter", "{adapter}", "--base", "{other_model}", "hi"],
         ["was saved for base", "differs from this model at", "from Python: load_adapter(..., force=True)"]),
    # ---------------------------------------------------------------- outputs: never destroyed
    Case("merge-into-user-folder", ["merge", "{adapter}", "{case}/victim"],
         ["output folder", "victim is not empty and is not a merged folder lorakit wrote", "--overwrite"],
         {"victim/important.txt": "keep me\n"}),
    Case("merge-into-run-folder", ["merge", "{run}/adapter", "{run}"], ["is, or holds, the input", "/adapter"]),
    Case("merge-into-run-folder-overwrite", ["merge", "{run}/adapter", "{run}", "--overwrite"],
         ["is, or holds, the input"]),
    Case("merge-into-the-adapter", ["merge", "{adapter}", "{adapter}"], ["is, or holds, the input"]),
    Case("merge-into-the-base", ["merge", "{adapter}", "{model}"], ["is, or holds, the input"]),
    Case("merge-output-is-a-file", ["merge", "{adapter}", "{case}/out"], ["output", "out is a file"],
         {"out": "my notes\n"}),
    Case("export-merged-into-user-folder", ["export", "merged", "{adapter}", "{case}/victim"], ["--overwrite"],
         {"victim/important.txt": "keep me\n"}),
    Case("export-gguf-over-user-file", ["export", "gguf", "--adapter", "{adapter}", "{case}/notes.gguf"],
         ["output file", "notes.gguf exists and is not a gguf-adapter GGUF file lorakit wrote", "--overwrite"],
         {"notes.gguf": "my notes\n"}),
    Case("export-gguf-to-a-folder", ["export", "gguf", "--merged", "{adapter}", "{case}/dir"], ["dir is a folder"],
         {"dir/keep.txt": "x"}),
    Case("plot-torn-metrics", ["plot", "{case}"], ["metrics.jsonl:2: not a JSON record"],
         {"metrics.jsonl": '{"step": 1, "loss": 2.0}\n{"step": 2, "lo'}),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Shared inputs: a tiny model folder (and one of another shape), a good adapter saved for it, one with a
    NaN and one with an Inf, and a finished training run with its checkpoints."""
    root = tmp_path_factory.mktemp("world")
    paths = {"model": root / "tiny-llama", "other_model": root / "other-llama"}
    tiny_llama().save_pretrained(paths["model"])
    tiny_tokenizer().save_pretrained(paths["model"])
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    other.save_pretrained(paths["other_model"])
    tiny_tokenizer().save_pretrained(paths["other_model"])
    model, _ = load(str(paths["model"]))
    lorakit.inject(model, lorakit.LoraSpec(r=2, targets=["q_proj", "v_proj"]))
    randomize_adapters(model)
    paths["adapter"] = lorakit.save_adapter(model, root / "adapter")
    for name, value in (("nan_adapter", float("nan")), ("inf_adapter", float("inf"))):
        shutil.copytree(paths["adapter"], root / name)
        weights = root / name / "adapter_model.safetensors"
        tensors = load_file(weights)
        key = "base_model.model.model.layers.0.self_attn.q_proj." + ("lora_B.weight" if name == "nan_adapter"
                                                                     else "lora_A.weight")
        tensors[key][0, 0] = value
        save_file(tensors, weights, metadata={"format": "pt"})
        paths[name] = root / name
    run = paths["run"] = root / "run"
    run.mkdir()
    (run / "rows.jsonl").write_text(GOOD_ROWS)
    assert main(["train", f"base={paths['model']}", f"dataset={run / 'rows.jsonl'}", f"output_dir={run}",
                 "max_steps=2", "checkpoint_every=1", "eval=false", "lora.r=2", "batch_size=2"]) == 0
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    return paths


def snapshot(*folders: Path) -> dict[str, tuple]:
    """Every entry under `folders`: (kind, mode, content hash) by path; hidden temp files included."""
    found = {}
    for folder in folders:
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir():
                found[str(path)] = ("dir", path.stat().st_mode)
            else:
                found[str(path)] = ("file", path.stat().st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
    return found


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_cleanly(case: Case, world, tmp_path, capsys):
    folder = tmp_path / "case"
    folder.mkdir()
    for relative, content in case.files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    names = {"case": folder, **world}
    argv = [arg.format(**{k: str(v) for k, v in names.items()}) for arg in case.argv]
    before = snapshot(folder, world["model"].parent)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}; stderr:\n{err}"
    assert re.match(r"lorakit( [\w-]+)*: error: ", err.splitlines()[-1]) and "Traceback" not in err, err
    for fragment in case.expect:
        assert fragment.format(**{k: str(v) for k, v in names.items()}) in err, f"{fragment!r} not in:\n{err}"
    assert snapshot(folder, world["model"].parent) == before  # nothing created, changed or deleted


def test_read_only_output_dir_is_refused_before_training(world, tmp_path, capsys):
    """A folder this process cannot write in: a chmod'ed one, or, as root (who writes anywhere), /sys."""
    if os.geteuid() != 0:
        out = tmp_path / "locked"
        out.mkdir(mode=0o555)
    else:
        out = Path("/sys/lorakit-run")
        try:
            tempfile.TemporaryFile(dir="/sys").close()
            pytest.skip("running as root on a machine where root may write in /sys: no read-only folder to use")
        except OSError:
            pass
    (tmp_path / "rows.jsonl").write_text(GOOD_ROWS)
    code = main(["train", f"base={world['model']}", f"dataset={tmp_path / 'rows.jsonl'}", f"output_dir={out}",
                 "max_steps=2", "eval=false"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write in" in err and "Traceback" not in err, err
