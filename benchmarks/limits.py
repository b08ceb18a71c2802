"""What limits each goal when a run does not meet it: notes keyed by a substring of the goal's name.

Written from profiling (see the README in this folder); shown under the goals table only for goals not met.
"""

from __future__ import annotations

LIMITS: dict[str, str] = {}
