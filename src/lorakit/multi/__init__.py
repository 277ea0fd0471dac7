"""Many adapters over one base: per-row routing of mixed batches, and the adapter store."""

from lorakit.multi.routing import RowRouting, route
from lorakit.multi.store import AdapterStore, UnknownAdapterError

__all__ = ["AdapterStore", "RowRouting", "UnknownAdapterError", "route"]
