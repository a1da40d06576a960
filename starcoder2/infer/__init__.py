"""Inference: pure sampling functions, the reference generation loop, and text streaming with stops."""
