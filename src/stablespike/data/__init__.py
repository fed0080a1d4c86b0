"""Offline data sets and input encoders."""
from .datasets import (DATASETS, Dataset, augment_cifar, load_dataset, read_idx, stratified_split,
                       stratified_subset)
from .encoding import ENCODERS, direct, encode, latency, rate, sequence

__all__ = ["DATASETS", "Dataset", "augment_cifar", "load_dataset", "read_idx", "stratified_split",
           "stratified_subset",
           "ENCODERS", "direct", "encode", "latency", "rate", "sequence"]
