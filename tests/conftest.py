"""Settings for every tier.

Hypothesis: no per-example deadline. Tests here assert behaviour, never time; on a loaded
2-core runner a slow example (a real `iptables-restore --test`, a big render) is not a failure.
"""

from hypothesis import settings

settings.register_profile("pyproxy", deadline=None)
settings.load_profile("pyproxy")
