"""velora_fx: VeLoRA as a PyTorch compiler pass.

Keep, for the weight gradient of each large linear-layer input, only the
projections of its sub-tokens on one fixed unit vector, without changing
model code::

    model = velora_fx.prepare(model)                                   # its state lives in model.state_dict()
    model = torch.compile(model, backend=velora_fx.backend)            # the compile backend
    gm = velora_fx.transform(torch.fx.symbolic_trace(model))           # or the FX route, for eager training
    print(velora_fx.report(model))

Other estimators by config: the token-level projections (``VeloraConfig(estimator=velora_fx.RandomProjection(rank=32))``,
``Principal``, ``PrincipalRandom``) and every coordinate at a few bits (``VeloraConfig(estimator=velora_fx.Quantized(bits=2))``).
"""

from .config import INIT_MODES, Principal, PrincipalRandom, Quantized, RandomProjection, Velora, VeloraConfig
from .state import Projection, load_state, prepare, projections
from .fx import transform
from .ops import project, reconstruct, velora_linear
from .report import Report, SiteRecord, report
from .calibration import calibrate
from .compile_backend import backend, make_backend

__all__ = [
    "INIT_MODES",
    "Principal",
    "PrincipalRandom",
    "Projection",
    "Quantized",
    "RandomProjection",
    "Report",
    "SiteRecord",
    "Velora",
    "VeloraConfig",
    "backend",
    "calibrate",
    "load_state",
    "make_backend",
    "prepare",
    "project",
    "projections",
    "reconstruct",
    "report",
    "transform",
    "velora_linear",
]
__version__ = "0.3.0"

