"""Start-up compatibility fixes for a Detectron2 installed without its C++ extension.

``tools/install_detectron2.py`` installs Detectron2 v0.6 from the ``pb1-detectron2`` sdist, which
lacks the C++ sources of ``detectron2._C``; v0.6 also predates current NumPy and Pillow. It
installs this module next to Detectron2 (top level of the environment's site-packages) together
with ``smallbn_d2_detectron2_compat.pth``, whose one line ``import smallbn_d2_detectron2_compat;
smallbn_d2_detectron2_compat.install()`` runs at interpreter start-up. Any program in that
environment can then use Detectron2 without importing smallbn_d2 first.

At start-up :func:`install` only puts one small finder, :class:`Detectron2ImportHook`, first on
``sys.meta_path``; it imports nothing (no NumPy, no Pillow) and answers every import with "not
mine" after one string comparison. When the top-level name ``detectron2`` is imported for the
first time it applies, once:

1. **``detectron2._C`` fallback.** :class:`ExtensionFallbackFinder` is appended at the *end* of
   ``sys.meta_path``, so it is consulted only when no other finder finds ``detectron2._C``: a
   compiled extension always wins and is used untouched. Without one, ``import
   detectron2.layers`` works and the ops that need ``_C`` (rotated boxes, rotated RoIAlign,
   deformable convolution on CUDA, the fast COCO evaluation) raise
   :class:`MissingExtensionError` naming the op when called; ``get_compiler_version``,
   ``get_cuda_version`` and ``has_cuda`` report the stub. The stub module carries
   ``__smallbn_stub__ = True`` (read by ``smallbn_d2.compat.has_compiled_ops``).
2. **NumPy aliases.** NumPy >= 1.24 removed ``np.int``, ``np.float`` and ``np.bool``, which v0.6
   still uses; they are restored as the builtins they always aliased (only where missing).
3. **Pillow alias.** Pillow >= 10 removed ``Image.LINEAR`` (a default argument in v0.6's
   transforms); it is restored as ``Image.BILINEAR``, the filter it always named.

None of this copies Detectron2 code, and all of it is idempotent. Setting the environment
variable ``SMALLBN_D2_DETECTRON2_COMPAT=0`` disables it (for debugging). The source of this module
lives in smallbn_d2's repository under ``tools/detectron2_compat/``.
"""
import os
import sys

__all__ = [
    "MissingExtensionError",
    "Detectron2ImportHook",
    "ExtensionFallbackFinder",
    "install",
    "DISABLE_ENV",
]

#: Environment variable: "0" disables :func:`install` (nothing is put on ``sys.meta_path``).
DISABLE_ENV = "SMALLBN_D2_DETECTRON2_COMPAT"

_EXTENSION = "detectron2._C"
_STUB_REPORT = "none: detectron2._C is the stub of smallbn_d2_detectron2_compat (no compiled extension)"


class MissingExtensionError(RuntimeError):
    """Raised when an op of Detectron2's C++ extension is called but no compiled ``_C`` exists."""


class _MissingExtension(type(sys)):
    """Stand-in for ``detectron2._C``: every public attribute is a callable that raises
    :class:`MissingExtensionError` naming the op, except three informational functions."""

    __smallbn_stub__ = True

    @staticmethod
    def get_compiler_version() -> str:
        """Called by ``detectron2.utils.collect_env``: reports the stub."""
        return _STUB_REPORT

    @staticmethod
    def get_cuda_version() -> str:
        """Called by ``detectron2.utils.collect_env``: reports the stub."""
        return _STUB_REPORT

    @staticmethod
    def has_cuda() -> bool:
        """The stub has no CUDA kernels."""
        return False

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise MissingExtensionError(
                f"detectron2._C.{name} is not available: this detectron2 has no compiled C++ "
                "extension (e.g. installed from the pb1-detectron2 sdist, which lacks its "
                "sources), so rotated boxes, rotated RoIAlign, deformable convolution on CUDA "
                "and the fast COCO evaluation cannot run. Use an official detectron2 source "
                "build (with a compiled detectron2._C) for them."
            )

        missing.__name__ = name
        missing.__qualname__ = f"detectron2._C.{name}"
        return missing


class ExtensionFallbackFinder:
    """Meta-path finder and loader of the ``detectron2._C`` stub; consulted last.

    ``find_spec`` answers only the name ``detectron2._C``; :func:`install` appends this finder
    to the end of ``sys.meta_path`` so that any real extension is found first.
    """

    def find_spec(self, fullname, path=None, target=None):
        """A spec for the stub if ``fullname`` is ``detectron2._C``, else None."""
        if fullname != _EXTENSION:
            return None
        from importlib.machinery import ModuleSpec

        return ModuleSpec(fullname, self, origin="smallbn_d2_detectron2_compat (stub)")

    def create_module(self, spec):
        """The stub module (:class:`MissingExtensionError` on use of any op)."""
        return _MissingExtension(spec.name)

    def exec_module(self, module):
        """Nothing to execute: the stub's attributes are computed on access."""


class Detectron2ImportHook:
    """First on ``sys.meta_path``: applies the fixes when ``detectron2`` is first imported.

    ``find_spec`` always returns None (the normal finders then find Detectron2); for the name
    ``detectron2`` it first calls :meth:`apply` once.
    """

    def __init__(self):
        self.applied = False

    def find_spec(self, fullname, path=None, target=None):
        """Apply the fixes on the first lookup of ``detectron2``; never finds anything."""
        if fullname == "detectron2" and not self.applied:
            self.apply()
        return None

    def apply(self) -> None:
        """Append the ``_C`` fallback at the end of ``sys.meta_path`` (now, so that finders
        added at start-up, e.g. by editable installs, come before it) and set the NumPy and
        Pillow aliases. Idempotent; raises nothing when NumPy or Pillow is not installed."""
        self.applied = True
        if not any(isinstance(f, ExtensionFallbackFinder) for f in sys.meta_path):
            sys.meta_path.append(ExtensionFallbackFinder())
        try:
            import numpy as np
        except ImportError:
            pass
        else:
            for name, builtin in (("int", int), ("float", float), ("bool", bool)):
                if name not in np.__dict__:
                    setattr(np, name, builtin)
        try:
            from PIL import Image
        except ImportError:
            pass
        else:
            if not hasattr(Image, "LINEAR"):
                Image.LINEAR = Image.BILINEAR


def install() -> bool:
    """Put :class:`Detectron2ImportHook` first on ``sys.meta_path`` (once). Run at start-up by
    ``smallbn_d2_detectron2_compat.pth``.

    Returns False (and does nothing) if ``SMALLBN_D2_DETECTRON2_COMPAT=0``, else True. If
    ``detectron2`` is already imported, applies the fixes at once. Raises nothing.
    """
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return False
    hook = next((f for f in sys.meta_path if isinstance(f, Detectron2ImportHook)), None)
    if hook is None:
        hook = Detectron2ImportHook()
        sys.meta_path.insert(0, hook)
    if "detectron2" in sys.modules and not hook.applied:
        hook.apply()
    return True
