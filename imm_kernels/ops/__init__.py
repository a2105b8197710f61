"""Fused ops, one file each (kernels, launchers, custom op, autograd), and their references."""
