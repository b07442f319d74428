"""Adaptation methods. Each yields a :class:`Classifier`: images in [0, 1] -> logits."""

from transferlab.classifiers.base import Classifier, load_classifier, save_classifier

__all__ = ["Classifier", "load_classifier", "save_classifier"]
