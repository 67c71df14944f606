"""Compiler: model loading and export, structure analysis, the pass pipeline, builds."""
