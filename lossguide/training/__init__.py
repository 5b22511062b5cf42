"""Training scripts for the project's default models (``python -m lossguide.training NAME``)."""
