"""hspace: interpretable directions in the semantic latent space (h-space) of diffusion models."""

from .directions.direction import Direction
from .engine import Engine
from .errors import HspaceError
from .hooks import H_LOCATIONS
from .steering import record, steer
from .trajectory import Trajectory

__all__ = ["Direction", "Engine", "HspaceError", "H_LOCATIONS", "Trajectory", "steer", "record"]
__version__ = "0.1.0"
