"""``lossguide experiment NAME``: the paper's analysis experiments as commands.

Each experiment is a function ``run(out: Path, quick: bool = False) -> dict`` that writes a folder with
``report.md`` (tables, figures, the command that made them and a reading), PNG figures and the raw
numbers as JSON/CSV, and returns a summary dict. Seeds are fixed inside each experiment and recorded
in its JSON. The registry maps names to ``"module:function"`` so that importing it costs nothing.

Experiments share file names (``report.md``, ``results.csv``, ``samples.png``), so each folder belongs to one:
:func:`run` opens it as an :class:`ExperimentFolder` (a :class:`~lossguide.runfolder.Folder`: a lock, its marker
:data:`MARKER` as its config) and refuses a folder marked by another experiment (or loss); the CLI
writes experiment NAME into ``--out``/NAME (``NAME-feature`` with ``--loss feature``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lossguide.runfolder import LOCK, Folder

EXPERIMENTS: dict[str, str] = {
    "loss-curves": "lossguide.experiments.understanding:loss_curves",
    "gradients": "lossguide.experiments.understanding:gradients",
    "adversarial-gap": "lossguide.experiments.understanding:adversarial_gap",
    "convergence": "lossguide.experiments.understanding:convergence",
    "ablation": "lossguide.experiments.understanding:ablation",
    "ra-cost": "lossguide.experiments.understanding:ra_cost",
    "oracle": "lossguide.experiments.oracle_exp:run",
    "motion": "lossguide.experiments.motion:run",
    "autoguidance": "lossguide.experiments.autoguidance:run",
    "layout": "lossguide.experiments.layout:run",
    "distill": "lossguide.experiments.distill:run",
    "optimization": "lossguide.experiments.optimization:run",
    "particles": "lossguide.experiments.particles:run",
    "transfer": "lossguide.experiments.transfer:run",
    "contraction": "lossguide.experiments.contraction:run",
    "solver-error": "lossguide.experiments.solver_error:run",
}


def get(name: str) -> Callable[..., dict]:
    """The experiment function registered as ``name``; unknown names raise a one-line error."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)} or all")
    module, fn = EXPERIMENTS[name].split(":")
    return getattr(importlib.import_module(module), fn)


#: experiments that take ``loss="ce"|"feature"`` (the guide's cross-entropy or its class feature distance)
LOSS_AWARE = ("loss-curves", "gradients", "adversarial-gap", "convergence", "ablation")
LOSS_KINDS = ("ce", "feature")
#: the file naming the experiment whose files a folder holds
MARKER = ".lossguide-experiment"


def folder_name(name: str, loss: str = "ce") -> str:
    """The folder (and marker) label of experiment ``name`` with class loss ``loss``: NAME or NAME-feature."""
    return name if loss == "ce" else f"{name}-{loss}"


class ExperimentFolder(Folder):
    """An experiment's folder (:class:`~lossguide.runfolder.Folder`): its marker :data:`MARKER` names the experiment
    (and loss) whose files it holds; another experiment's is refused, since both write report.md, results.csv, ..."""

    CONFIG = MARKER

    def outputs(self) -> list[Path]:
        skip = {MARKER, LOCK}
        return sorted(p for p in self.path.iterdir() if p.name not in skip and not p.name.endswith(".tmp"))

    def _other(self, old_config: str, new_config: str) -> str:
        owner, label = old_config.strip(), new_config.strip()
        return (f"{self.path} holds the files of experiment {owner!r}, which {label!r} would overwrite (both write "
                f"report.md, results.csv, ...); pass another folder, e.g. {self.path.parent / label}")  # fmt: skip


def run(name: str, out: Path, quick: bool = False, loss: str = "ce") -> dict:
    """Run experiment ``name`` into ``out`` (created if needed), with the class loss ``loss``."""
    if loss not in LOSS_KINDS:
        raise ValueError(f"unknown --loss {loss!r}; choose one of {', '.join(LOSS_KINDS)}")
    fn = get(name)
    if loss != "ce" and name not in LOSS_AWARE:
        raise ValueError(f"experiment {name!r} has no class loss to switch; --loss applies to {', '.join(LOSS_AWARE)}")
    with ExperimentFolder(out).open(folder_name(name, loss) + "\n"):
        return fn(Path(out), quick=quick, **({"loss": loss} if name in LOSS_AWARE else {}))


def command_line(name: str, quick: bool, loss: str = "ce") -> str:
    """The command that reruns experiment ``name`` (with ``--quick``, ``--loss``), as reports print it."""
    return f"lossguide experiment {name}" + (" --quick" if quick else "") + (f" --loss {loss}" if loss != "ce" else "")


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread inside the block (tiny tensors: one thread is fastest), the caller's count after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
