"""Fused Triton kernels for LXMERT (installed as lxmert_fast.kernels)."""
