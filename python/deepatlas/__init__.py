"""DeepAtlas (Xu & Niethammer, MICCAI 2019): joint registration + segmentation built on the deepatlas_cuda ops."""

__version__ = "0.1.0"
