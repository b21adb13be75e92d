"""Import smallbn_d2 before any test module imports Detectron2: it applies the v0.6
compatibility fixes (smallbn_d2.compat) and sets the default datasets root."""
import smallbn_d2  # noqa: F401
