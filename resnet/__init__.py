"""resnet: distributed ResNet training on packed WebDataset shards."""

__version__ = "0.1.0"
