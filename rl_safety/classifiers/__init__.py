"""Robust image classifiers: DyART, PGD-AT, TRADES and standard training, evaluated with torchattacks."""
