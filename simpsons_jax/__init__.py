"""simpsons_jax: name the Simpsons character in an episode frame with JAX/Flax."""

from simpsons_jax import host_memory

# Before JAX's CPU client starts its threads: see host_memory.
host_memory.keep_freed_memory()
