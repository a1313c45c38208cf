"""The data formats of offline jobs, one object each (`OfflineDataFormat`, `base.py`), by name.

An offline objective names its format (`OfflineObjective.data_format`); `JobData` builds batches, the
reference scores them and the trainer takes their loss through that object. Adding a format is a module
here with its class and one line in `DATA_FORMATS` below.
"""

from __future__ import annotations

from types import MappingProxyType

from rlhf_ray.offline_formats.base import OfflineDataFormat
from rlhf_ray.offline_formats.builtin import KTOFormat, PreferenceFormat, PromptFormat, RankedFormat, SFTFormat
from rlhf_ray.offline_formats.multi_turn import MultiTurnPreferenceFormat

DATA_FORMATS = MappingProxyType({fmt.name: fmt for fmt in (
    SFTFormat(), PreferenceFormat(), KTOFormat(), RankedFormat(), PromptFormat(), MultiTurnPreferenceFormat(),
)})


def data_format(name: str) -> OfflineDataFormat:
    """The format object named `name` (an objective's `data_format`, or `JobData.kind`)."""
    try:
        return DATA_FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown data format {name!r}; known: {', '.join(DATA_FORMATS)}") from None


__all__ = ["OfflineDataFormat", "DATA_FORMATS", "data_format"]
