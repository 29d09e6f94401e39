import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI: derandomized, no deadline (Inductor compiles take seconds), no example database (nothing is written into the
# working tree). VELORA_FX_HYPOTHESIS=thorough draws fresh examples for the tests whose count the profile sets.
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=25, database=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", deadline=None, max_examples=400, database=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("thorough" if os.environ.get("VELORA_FX_HYPOTHESIS") == "thorough" else "ci")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Many tests compile the same small model classes; past Dynamo's recompile limit a frame silently runs
# eagerly (no backend at all), which would make backend tests vacuous. Raise it for the test session.
torch._dynamo.config.recompile_limit = 256
torch._dynamo.config.accumulated_recompile_limit = 4096
