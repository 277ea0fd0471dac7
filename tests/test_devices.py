"""Device names: auto/cpu resolve here; CUDA names are refused with what is available on a CPU machine."""

import pytest
import torch

from lorakit.devices import available_devices, resolve_device


def test_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert available_devices()[0] == "cpu"


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:x", "", 5])
def test_unknown_names_are_refused(name):
    with pytest.raises(ValueError, match="device"):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_cuda_names_what_is_available(name):
    with pytest.raises(ValueError, match=r"not available.*available: cpu"):
        resolve_device(name)


# ---- device names in configs and commands ---------------------------------------------------------------


from lorakit.config import TrainConfig, load_train_config  # noqa: E402
from lorakit.devices import check_device_name, device_metrics, peak_memory_mb, resolve_precision  # noqa: E402


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:7"])
def test_config_takes_every_device_form_without_asking_whether_it_exists(name):
    """A config written for an 8-GPU machine reads (and prints) on a laptop; existence is checked at run time."""
    assert load_train_config(None, [f"device={name}"]).device == name
    assert check_device_name(name) == name


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "tpu", "CPU", 0])
def test_config_refuses_a_malformed_device_naming_the_field(name):
    with pytest.raises(ValueError, match=r"overrides: device(: expected a string| must be one of auto, cpu, cuda, "
                                         r"cuda:N), got"):  # YAML reads `cuda:` as a mapping, 0 as a number
        load_train_config(None, [f"device={name}"])


def test_defaults_are_auto_and_the_cpu_demo_stays_fp32():
    cfg = TrainConfig()
    assert (cfg.device, cfg.precision) == ("auto", "auto")
    assert resolve_precision(cfg.precision, torch.device("cpu")) == "fp32"


@pytest.mark.parametrize(("precision", "device", "bf16_ok", "want"), [
    ("auto", "cpu", True, "fp32"),  # bf16 matmuls are slow on most CPUs: never chosen for them
    ("auto", "cuda", True, "bf16"),
    ("auto", "cuda", False, "fp32"),  # a GPU without bf16 (pre-Ampere)
    ("fp32", "cuda", True, "fp32"),
    ("bf16", "cpu", False, "bf16"),  # asked for: as before
])
def test_precision_auto_is_bf16_on_a_cuda_device_that_supports_it(monkeypatch, precision, device, bf16_ok, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    assert resolve_precision(precision, torch.device(device)) == want


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        load_train_config(None, ["precision=fp16"])


def test_qlora_compute_dtype_auto_follows_the_run(monkeypatch):
    from lorakit.train.run import compute_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cfg = load_train_config(None, ["quant={}"])
    assert cfg.quant.compute_dtype == "auto"
    assert compute_dtype(cfg, torch.device("cpu")) == torch.float32  # the CPU: unchanged
    assert compute_dtype(cfg, torch.device("cuda", 0)) == torch.bfloat16
    fp32 = load_train_config(None, ["quant={}", "precision=fp32"])
    assert compute_dtype(fp32, torch.device("cuda", 0)) == torch.float32
    explicit = load_train_config(None, ["quant.compute_dtype=float16"])
    assert compute_dtype(explicit, torch.device("cuda", 0)) == torch.float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_train_with_a_missing_cuda_device_fails_before_any_model_loads(monkeypatch, tmp_path):
    import lorakit.train.run as train_run

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded before the device was checked")

    monkeypatch.setattr(train_run, "load", no_load)
    cfg = load_train_config(None, ["device=cuda:1", f"output_dir={tmp_path / 'out'}", "base=/nonexistent"])
    with pytest.raises(ValueError, match=r"device 'cuda:1' is not available.*available: cpu"):
        train_run.run(cfg, log=lambda _m: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("argv", [
    ["generate", "hi", "--base", "/nonexistent", "--device", "cuda"],
    ["eval", "/nonexistent-adapter", "--device", "cuda:2"],
    ["merge", "/nonexistent-adapter", "out", "--device", "cuda"],
    ["export", "merged", "/nonexistent-adapter", "out", "--device", "cuda"],
    ["export", "gguf", "--merged", "/nonexistent-adapter", "out.gguf", "--device", "cuda"],
    ["serve", "--base", "/nonexistent", "--device", "cuda:1"],
    ["train", "device=cuda", "base=/nonexistent"],
])
def test_commands_name_a_missing_cuda_device_before_reading_anything(capsys, argv):
    from lorakit.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error: device 'cuda") and "available: cpu" in err


def test_commands_refuse_a_malformed_device(capsys):
    from lorakit.cli import main

    assert main(["generate", "hi", "--device", "tpu"]) == 2
    assert "device must be one of auto, cpu, cuda, cuda:N" in capsys.readouterr().err


# ---- peak device memory -------------------------------------------------------------------------------


def test_peak_device_memory_is_reported_on_cuda_and_absent_on_cpu(monkeypatch):
    assert peak_memory_mb(torch.device("cpu")) is None
    assert device_metrics(torch.device("cpu")) == {}
    asked = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: asked.append(device) or 3 << 20)
    cuda = torch.device("cuda", 0)
    assert peak_memory_mb(cuda) == 3.0
    assert device_metrics(cuda) == {"peak_device_mb": 3.0}
    assert asked == [cuda, cuda]  # the run's own device, not the current one


def test_cpu_training_writes_no_device_memory_in_metrics_and_none_in_results(tiny_model_dir, jsonl, tmp_path):
    import json

    from lorakit.train.run import run

    cfg = load_train_config(None, [f"base={tiny_model_dir}", f"dataset={jsonl}", "max_steps=2", "batch_size=2",
                                   "eval=false", "device=cpu", f"output_dir={tmp_path}", "lora.r=2"])
    _, results = run(cfg, log=lambda _m: None)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records and all("peak_device_mb" not in r and r["peak_rss_mb"] > 0 for r in records)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["peak_device_mb"] is None and results["peak_device_mb"] is None
    assert (saved["device"], saved["precision"]) == ("cpu", "fp32")


def test_loader_quant_compute_dtype_auto_is_bf16_on_cuda_only(monkeypatch):
    """`models.load(quant=QuantConfig())` (compute_dtype auto) resolves it for the device it loads to."""
    from lorakit.config import QuantConfig
    from lorakit.quant.linear4bit import quant_record

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert quant_record(QuantConfig(), torch.device("cpu"))["compute_dtype"] == "float32"
    assert quant_record(QuantConfig(), torch.device("cuda", 0))["compute_dtype"] == "bfloat16"
    assert quant_record({"compute_dtype": "float16"}, torch.device("cuda", 0))["compute_dtype"] == "float16"
    assert quant_record(QuantConfig())["compute_dtype"] == "float32"  # no device named: the CPU's


def test_loader_takes_the_default_quant_config(tiny_model_dir):
    from lorakit.config import QuantConfig
    from lorakit.models import load
    from lorakit.quant.linear4bit import quantization_of

    model, _ = load(str(tiny_model_dir), quant=QuantConfig(), device="cpu")
    assert quantization_of(model)["compute_dtype"] == "float32"


def test_the_serving_engine_imports_without_fastapi():
    """The lent GPU image has no fastapi: the engine (what tests/test_gpu.py serves through) must not need it;
    the HTTP front end still imports it when asked for."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['fastapi'] = None\n"  # `import fastapi` now fails
            "from lorakit.serve import Engine\n"
            "try:\n    from lorakit.serve import make_app\nexcept ImportError:\n    print('front end needs fastapi')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "front end needs fastapi"
