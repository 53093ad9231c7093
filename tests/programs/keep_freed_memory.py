"""Run by tests/test_ops_allocator.py in a fresh interpreter (before JAX starts any thread):
prints what diffusion_jax.ops.allocator.keep_freed_memory() returned, True or False."""

from diffusion_jax.ops import allocator

print(allocator.keep_freed_memory())
