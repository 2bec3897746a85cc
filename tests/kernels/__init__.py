"""Tests of kernels/: the registry's dispatch, UNet patching, weight updates."""
