"""vlp: CLIP-style vision-language pretraining on webdataset shards."""
__version__ = "0.1.0"
