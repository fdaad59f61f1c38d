"""Shared pytest setup: hypothesis profiles.

``fast`` (the default) keeps ``make test`` quick; ``HYPOTHESIS_PROFILE=deep`` runs many more
examples for a thorough pass.
"""

from __future__ import annotations

import os
import tempfile

from hypothesis import HealthCheck, settings

# Learned memory and evidence logs of every sidestep the tests start (in-process or not) go to
# a throwaway folder, never the state directory of whoever runs the tests.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="sidestep-test-state-")

settings.register_profile(
    "fast", max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "deep", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))
