"""The old import path of ``lossguide bench``: re-exports of :mod:`lossguide.harness` (runner in
:mod:`~lossguide.harness.bench`, outputs in :mod:`~lossguide.harness.report`)."""

from lossguide.harness.bench import FID_CEILING, Bench, BenchConfig, Ranks, Shard, check_config
from lossguide.harness.methods import METHODS, MODIFIERS, method_config, parse_method, tuned_param
from lossguide.harness.report import comparable, write_outputs
from lossguide.harness.tasks import CLASS_TASKS, MNIST_TASKS, ORACLE_TASKS, TASKS
from lossguide.harness.tasks.mnist import MnistTask
from lossguide.harness.tasks.oracle import OracleTaskAdapter
from lossguide.harness.tuning import beam_search

__all__ = ["FID_CEILING", "Bench", "BenchConfig", "Ranks", "Shard", "check_config", "METHODS", "MODIFIERS",
           "method_config", "parse_method", "tuned_param", "comparable", "write_outputs", "CLASS_TASKS",
           "MNIST_TASKS", "ORACLE_TASKS", "TASKS", "MnistTask", "OracleTaskAdapter", "beam_search"]  # fmt: skip
