"""The frameworks that train: each framework's Network (stages/frameworks/__init__.py) with
its `fit` and, for PyTorch, the launcher of its data-parallel workers. Like `network()`,
`trainer()` imports the framework it is asked for and no other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.frameworks import Network, network
from stages.runtime.failures import DataError
from stages.runtime.params import FRAMEWORKS

if TYPE_CHECKING:
    from stages.runtime.params import TrainConfig


@dataclass(frozen=True)
class Trainer:
    network: Network
    # (cfg, data, curves_dir) -> the trained model: data holds x_train, y_train, x_val and
    # y_val, and is emptied as fit takes the arrays; curves_dir None on workers but the first.
    fit: Callable[[TrainConfig, dict, Path | None], Any]
    # (cfg, argv): the stage's command run as cfg.workers processes; None: one process only.
    launch: Callable[[TrainConfig, list[str]], None] | None = None


def trainer(framework: str) -> Trainer:
    """The named framework's Trainer; imports that framework only."""
    match framework:
        case "keras":
            from stages.frameworks.keras.fit import fit
            return Trainer(network(framework), fit)
        case "torch":
            from stages.frameworks.torch.fit import fit
            from stages.frameworks.torch.launcher import launch
            return Trainer(network(framework), fit, launch)
        case "c":
            from stages.frameworks.c.fit import fit
            return Trainer(network(framework), fit)
        case _:
            raise DataError(f"framework {framework!r} is none of {', '.join(FRAMEWORKS)}")
