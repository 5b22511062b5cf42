"""The harness around the engine: one method grammar, one tuner, one task protocol, one settings store.

:mod:`~lossguide.harness.methods` parses a method spec (``freedom+polyak``, ``shen2024-ra``) into a guidance
config; :mod:`~lossguide.harness.tasks` holds the tasks (MNIST, oracle) that give loss, model and metrics per
seed; :mod:`~lossguide.harness.tuning` the tuners and every command's tuning seeds;
:mod:`~lossguide.harness.settings` the shipped step parameters (``settings.json``); :mod:`~lossguide.harness.bench`
runs ``lossguide bench`` and :mod:`~lossguide.harness.report` writes its tables and figures.
"""
