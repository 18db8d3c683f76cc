"""simpsons_jax: name the Simpsons character in an episode frame with JAX/Flax."""
