"""The data layer: scanning, validating, splitting and transforming labelled images."""

from .images import IMAGE_EXTENSIONS, ImageInfo, decode, is_image_path, load_image, to_rgb
from .loader import ImageFiles, collate_images
from .scan import Dataset, Sample, Skipped, scan
from .split import (SPLITS, read_split_csv, split_dataset, stratified_split, write_skipped_csv,
                    write_split_csv)
from .transforms import AUGMENT_PRESETS, EvalTransform, Preprocessing, TrainTransform, to_uint8_tensor

__all__ = [
    "IMAGE_EXTENSIONS", "ImageInfo", "decode", "is_image_path", "load_image", "to_rgb",
    "ImageFiles", "collate_images",
    "Dataset", "Sample", "Skipped", "scan",
    "SPLITS", "read_split_csv", "split_dataset", "stratified_split", "write_skipped_csv",
    "write_split_csv",
    "AUGMENT_PRESETS", "EvalTransform", "Preprocessing", "TrainTransform", "to_uint8_tensor",
]
