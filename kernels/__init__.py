"""Triton kernels of dmgrd's hot paths (installed as dmgrd.kernels)."""
