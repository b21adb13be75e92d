"""What smallbn_d2 needs to know at run time about the Detectron2 it runs with.

The environment, not this package, makes a Detectron2 without its C++ extension usable:
``tools/install_detectron2.py`` installs Detectron2 v0.6 from the ``pb1-detectron2`` sdist
together with the start-up module ``smallbn_d2_detectron2_compat`` (source in the repository's
``tools/detectron2_compat/``). When ``detectron2`` is first imported, that module serves a stub
``detectron2._C`` if and only if no compiled one exists, and restores the NumPy and Pillow
aliases v0.6 uses. Importing this module has no side effects.

* :func:`has_compiled_ops` tells whether ``detectron2._C`` is a compiled extension. When it is
  not, the start-up module also makes every ``COCOEvaluator`` evaluate with pycocotools' COCOeval
  (same AP) instead of the fast path that needs ``_C``.
* :class:`MissingExtensionError` is what the stub's ops raise.
"""
from __future__ import annotations

__all__ = ["MissingExtensionError", "has_compiled_ops"]

try:  # the class the stub raises, when the start-up module is installed
    from smallbn_d2_detectron2_compat import MissingExtensionError
except ImportError:  # a Detectron2 installed otherwise: no stub, so nothing raises it

    class MissingExtensionError(RuntimeError):
        """Raised when an op of Detectron2's C++ extension is used but no compiled ``_C`` exists."""


def has_compiled_ops() -> bool:
    """True if ``detectron2._C`` is a compiled extension; False if it is the stub of
    ``smallbn_d2_detectron2_compat`` (marker ``__smallbn_stub__``) or cannot be imported.

    Imports ``detectron2``; raises nothing else.
    """
    try:
        import detectron2._C as ext
    except ImportError:
        return False
    return not getattr(ext, "__smallbn_stub__", False)
