"""`host_memory.reuse_freed_memory`: XLA:CPU's large temporaries are reused instead of page-faulted in per call."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from ec_dit import host_memory

PROBE = textwrap.dedent("""
    import resource
    from ec_dit import host_memory
    applied = host_memory.reuse_freed_memory()
    import jax, jax.numpy as jnp
    x = jnp.ones((3072, 3072))
    f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x) @ x) + jnp.sum(jnp.sin(x @ x.T) @ x))
    f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults_per_call(choice):
  env = dict(os.environ, EC_DIT_HOST_MALLOC=choice, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
  applied, faults = out.stdout.split()
  return applied == "True", int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_reuse_stops_the_per_call_page_faults():
  applied, reuse = _faults_per_call("reuse")
  not_applied, default = _faults_per_call("default")
  assert applied and not not_applied
  # glibc's default: the call's large buffers are fresh mappings, faulted in page by page.
  assert default > 20 * reuse, (default, reuse)


def test_bad_environment_value_is_named(monkeypatch):
  monkeypatch.setenv("EC_DIT_HOST_MALLOC", "tcmalloc")
  with pytest.raises(ValueError, match="EC_DIT_HOST_MALLOC must be 'reuse' or 'default', got 'tcmalloc'"):
    host_memory.reuse_freed_memory()


def test_default_leaves_malloc_alone(monkeypatch):
  monkeypatch.setenv("EC_DIT_HOST_MALLOC", "default")
  assert host_memory.reuse_freed_memory() is False
