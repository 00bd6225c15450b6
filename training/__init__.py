"""SSOLE pre-training and evaluation (run from the checkout: ``python -m training.pretrain``)."""
