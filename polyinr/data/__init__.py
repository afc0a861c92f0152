"""Training images, from a source to batches: the procedural demo dataset (`demo`), the
sources it reads (an ImageNet folder or ILSVRC2012_img_train.tar, `sources`), conversion to
FFCV files with manifests (`convert`) and the seeded, resumable FFCV loader (`loader`).
Imports only polyinr.core. The names below are the package's public API."""

from polyinr.core.errors import DataError
from polyinr.data.convert import (
    beton_path,
    check_prepared,
    decode_square,
    manifest_path,
    prepare,
    read_manifest,
)
from polyinr.data.demo import make_demo_dataset
from polyinr.data.loader import Batches, EpochOrder, make_loader, read_all
from polyinr.data.sources import Source, scan_source

__all__ = [
    "Batches",
    "DataError",
    "EpochOrder",
    "Source",
    "beton_path",
    "check_prepared",
    "decode_square",
    "make_demo_dataset",
    "make_loader",
    "manifest_path",
    "prepare",
    "read_all",
    "read_manifest",
    "scan_source",
]
