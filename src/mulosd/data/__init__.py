from mulosd.data.fashion_mnist import (
    CLASS_NAMES,
    DEFAULT_DATA_DIRS,
    FashionMNIST,
    find_data_dir,
    load_fashion_mnist,
    read_idx,
    resize_images,
)

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_DATA_DIRS",
    "FashionMNIST",
    "find_data_dir",
    "load_fashion_mnist",
    "read_idx",
    "resize_images",
]
