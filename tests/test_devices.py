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
