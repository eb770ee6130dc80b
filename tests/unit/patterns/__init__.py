"""Tests of the semantic patterns (one module per pattern family)."""
