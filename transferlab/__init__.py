"""transferlab: adapt an ImageNet CNN to new images three ways, then attack the results."""

__version__ = "0.1.0"
