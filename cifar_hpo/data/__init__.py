"""Data: a source -> decoded uint8 arrays (cached) -> stratified split -> tensors on the device.

    from cifar_hpo import data
    dd = data.study_data("../shared/data/cifar10-jpeg.tar.gz", val_fraction=0.1, split_seed=42)

- `sources`: what ``--data`` names (``cifar10`` download, a folder, an archive, the python batches).
- `decode`: images and batches -> arrays (PIL, worker processes for large jobs, safe unpickling).
- `cache`: decoded arrays kept once per source content, atomically written.
- `split`: `Dataset`, the stratified `Split`, `DeviceData` (tensors on the training device).

Imports go sources -> decode -> cache -> split; nothing here imports the layers above.
"""

from cifar_hpo.data.decode import IMAGE_SIZE, decode_image
from cifar_hpo.data.sources import cache_home, find_split_root, resolve_source
from cifar_hpo.data.split import (
    Dataset,
    DeviceData,
    Split,
    channel_stats,
    final_data,
    load_dataset,
    split_dataset,
    study_data,
    trial_data,
)

__all__ = [
    "IMAGE_SIZE", "Dataset", "DeviceData", "Split", "cache_home", "channel_stats", "decode_image", "final_data",
    "find_split_root", "load_dataset", "resolve_source", "split_dataset", "study_data", "trial_data",
]  # fmt: skip
