"""The one way a plan gets its layer timings: measured here on the configured backend, or read from a device
profile (`--profile`), at `--tokens` rows."""

from __future__ import annotations

from lrdeploy.bench.profiles import DeviceProfile
from lrdeploy.bench.timer import Timer
from lrdeploy.settings.build import BuildConfig


def build_timer(config: BuildConfig) -> Timer:
    profile = None if config.planning.profile is None else DeviceProfile.load(config.planning.profile)
    return Timer(config.planning.tokens, config.planning.backend.removeprefix("ort-"), config.threads, profile)
