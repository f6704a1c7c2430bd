"""Data-free calibration: the full-precision transformer teaches its own ternary copy.

Public API: `calibrate(pipe, prompts, config)` and `CalibConfig` (with its enums `Mode`,
`LossKind`, `TrainWhat`). One idea per module, imported only downwards:
config -> losses, states, student -> checkpoint -> joint, blockwise -> api -> command.

`bitflux.calibrate` is both this package and the function: `bitflux/__init__.py` runs
`from .calibrate import calibrate`, which first imports this package (binding the attribute
`bitflux.calibrate` to it) and then rebinds that attribute to the function, so
`import bitflux; bitflux.calibrate(pipe, prompts)` calls the function, while
`from bitflux.calibrate import CalibConfig` (and `from bitflux.calibrate.joint import train`)
still find the package through `sys.modules`.
"""

from .api import calibrate
from .config import CalibConfig, LossKind, Mode, TrainWhat

__all__ = ["CalibConfig", "LossKind", "Mode", "TrainWhat", "calibrate"]
