"""Direction methods: functions of trajectories and banks that return Directions."""

from .direction import Direction

__all__ = ["Direction"]
