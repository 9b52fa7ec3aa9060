"""Test-wide setup: 8 simulated CPU devices, so sharded code paths run on any machine."""

import os

from research.sharding import patient_cpu_collectives  # jax reads XLA_FLAGS at its first device use

os.environ["XLA_FLAGS"] = patient_cpu_collectives(" ".join(
    f for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
) + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

# Tests compile the same tiny steps many times; a persistent cache makes repeats cheap.
jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".cache", "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
