"""
NextClaude's trial tests.

Property tests share one hypothesis profile: no per-example deadline and no
"too slow" health check (both measure wall-clock time, which a loaded CI
machine stretches), no example database in the checkout, and, under
CI=true, derandomized so a CI run is repeatable.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "nextclaude",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
    derandomize=os.environ.get("CI") == "true",
)
settings.load_profile("nextclaude")
