"""Every test sees 8 CPU devices: the flag must be set before jax is imported.

XLA compiles the tests' programs with LLVM's optimisation of the generated CPU code off
(``--xla_backend_optimization_level=0``). What the tests check is decided before code
generation: the partitioned program, its collectives, buffers (memory) and FLOPs are those of the
optimised HLO, the same at either level (the model tests print the same compiled wire bytes,
memory and FLOPs), and what a program computes is the same computation. Code generation is most
of the compile time of a test's program, and compiling takes far longer than running it: this
halves the compile time of the model and pipeline tests.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
