"""Root pytest setup shared by tests/, the library's doctests and README.md."""

import atexit
import os
import shutil
import tempfile

# --xla_backend_optimization_level=0: the CPU backend compiles without LLVM's optimization
# passes. The tests run thousands of small programs once each (a random sampler per new
# shape alone takes about a second at the default level), so compiling dominates the run;
# it is several times faster this way, and the programs are small enough that running them
# slower costs little.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# What the tests and the docstring examples write through tempfile (the examples use
# mkdtemp) goes under one folder per test process, removed when the process exits.
_TMP = tempfile.mkdtemp(prefix="lora_jax_test_")
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
tempfile.tempdir = _TMP

# Many tests compile the same programs again (each CLI run builds its own jitted steps):
# a compilation cache for this test process, in a fresh directory, compiles each once.
_XLA_CACHE = tempfile.mkdtemp(prefix="xla_")
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)
