"""Optional TensorBoard logging: the numbers of each metrics.jsonl record as scalars (`tensorboard: true`).

metrics.jsonl stays the record of a run; this only mirrors it for people who watch runs in
TensorBoard. torch's SummaryWriter needs the `tensorboard` package, which lorakit does not
require: asking for it without the package installed is an error when the config is read
(`config.check_optional_dependencies`), before any model loads.
"""

from __future__ import annotations

from pathlib import Path


def open_tensorboard(folder: Path):
    """A SummaryWriter writing event files into `folder`."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("tensorboard: true needs the tensorboard package: "
                          ".venv/bin/python -m pip install tensorboard") from e
    return SummaryWriter(str(folder))


def write_scalars(writer, record: dict) -> None:
    """Every number of `record` but the step itself, as a scalar at `record["step"]`."""
    for key, value in record.items():
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
            writer.add_scalar(key, value, record["step"])
    writer.flush()
