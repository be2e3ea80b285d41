"""Adapter folders turned into per-module LoRA terms (A, B, scaling, DoRA magnitude) and replacements."""
