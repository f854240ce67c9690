"""Test set-up: 8 forced host devices so mesh tests run on a CPU.

This must run before jax initialises its backends, which is why it lives here.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
