"""Data: list a source, check and freeze its images, split them.

``pull_dataset`` turns a source into ``images/`` + ``manifest.csv`` + ``rejected.json``;
``split_manifest`` deals the manifest into train/val/test; ``open_rgb`` is how every later stage
reads an image, so all of them see the same pixels.
"""

from transferlab.data.images import ImageRejected, open_rgb
from transferlab.data.manifest import file_sha256, manifest_hash, read_manifest
from transferlab.data.pull import PullResult, pull_dataset
from transferlab.data.sources import DataSourceError
from transferlab.data.split import split_manifest

__all__ = [
    "DataSourceError",
    "ImageRejected",
    "PullResult",
    "file_sha256",
    "manifest_hash",
    "open_rgb",
    "pull_dataset",
    "read_manifest",
    "split_manifest",
]
