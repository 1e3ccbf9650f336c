"""kfold-stack: k-fold CNN ensembles for Kaggle-style image classification.

Stages (each a plain function taking the composed Hydra config):
``data`` -> ``folds`` -> [``tune``] -> ``train`` -> ``blend`` -> ``report``, and ``predict`` on
your own images; ``run.py`` dispatches ``cfg.stage``.
"""

__version__ = "0.1.0"
