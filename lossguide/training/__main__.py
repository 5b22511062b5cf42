"""``python -m lossguide.training NAME [args]``: run one of the project's training scripts."""

import importlib
import sys

SCRIPTS = {
    "ddpm": "lossguide.training.ddpm",
    "classifiers": "lossguide.training.classifiers",
    "evaluate-ddpm": "lossguide.training.evaluate_ddpm",
    "evaluate-cond": "lossguide.training.evaluate_cond",
    "motion": "lossguide.training.motion",
    "cond-ddpm": "lossguide.training.cond_ddpm",
    "flow": "lossguide.training.flow",
    "guide": "lossguide.training.guide",
    "tgdp": "lossguide.training.tgdp",
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in SCRIPTS:
        sys.exit(f"usage: python -m lossguide.training {{{','.join(SCRIPTS)}}} [args]")
    importlib.import_module(SCRIPTS[sys.argv[1]]).main(sys.argv[2:])
