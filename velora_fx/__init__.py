"""velora_fx: VeLoRA as a PyTorch compiler pass.

Keep, for the weight gradient of each large linear-layer input, only the
projections of its sub-tokens on one fixed unit vector, without changing
model code::

    gm = velora_fx.transform(torch.fx.symbolic_trace(model), velora_fx.VeloraConfig())
    print(velora_fx.report(gm))
"""

from .config import INIT_MODES, VeloraConfig
from .fx import calibrate, projections, transform
from .ops import project, reconstruct, velora_linear
from .projection import VeloraProjection
from .report import Report, SiteRecord, report
from .compile_backend import backend, load_state_dict, make_backend

__all__ = [
    "INIT_MODES",
    "VeloraConfig",
    "VeloraProjection",
    "Report",
    "SiteRecord",
    "backend",
    "calibrate",
    "load_state_dict",
    "make_backend",
    "project",
    "projections",
    "reconstruct",
    "report",
    "transform",
    "velora_linear",
]
__version__ = "0.1.0"
