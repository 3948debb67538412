"""Know your data: suspected label errors and learning curves, computed from cached features.

``data_issues`` and ``data_curve`` are what ``transferlab data issues`` and ``data curve`` call;
``train`` runs the same searches on its training split when they cost little.
"""

from .curve import LearningCurve, learning_curve
from .dataset import data_curve, data_issues, dataset_features
from .label_issues import LabelIssues, find_label_issues

__all__ = ["LearningCurve", "learning_curve", "LabelIssues", "find_label_issues", "data_issues", "data_curve",
           "dataset_features"]
