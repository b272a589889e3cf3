"""emjax: emergent misalignment through the geometry of feature superposition, in JAX/Flax."""

__version__ = "0.1.0"
