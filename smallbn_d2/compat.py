"""Compatibility of Detectron2 v0.6 with this environment: the one place that handles it.

Detectron2 v0.6 is installed from the ``pb1-detectron2`` sdist, which lacks the C++ sources of
``detectron2._C`` (see ``tools/install_detectron2.py``), and it predates current NumPy and
Pillow. :func:`install` (called first thing by ``import smallbn_d2``) applies three small,
idempotent fixes, none of which copies Detectron2 code:

1. ``detectron2._C`` fallback. A meta-path finder is *appended* to ``sys.meta_path``, so it is
   consulted only when no other finder finds ``detectron2._C``. A user with an official source
   build (a compiled ``_C``) therefore gets that build untouched. Without one, ``import
   detectron2.layers`` works and the ops that need ``_C`` (rotated boxes, rotated RoIAlign,
   deformable conv on CUDA -- v0.6 runs DeformConv on CPU through torchvision -- and the fast
   COCO evaluation) raise :class:`MissingExtensionError` naming the op when called. :func:`has_compiled_ops` tells which case is in use; the trainer then
   evaluates with pycocotools' own COCOeval (``use_fast_impl=False``), which gives the same AP.
2. NumPy >= 1.24 removed ``np.int``, ``np.float`` and ``np.bool``, which v0.6 still uses
   (data/build.py, structures/masks.py, evaluation): they are restored as the builtins they
   always aliased.
3. Pillow >= 10 removed ``Image.LINEAR`` (a default argument in v0.6's transforms): restored as
   ``Image.BILINEAR``, the filter it always named.

The third incompatibility, ``pkg_resources`` (removed in setuptools 81, imported by
``detectron2.model_zoo``), is handled by the pin ``setuptools<81`` in requirements.txt.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

__all__ = ["MissingExtensionError", "install", "has_compiled_ops"]

_EXTENSION = "detectron2._C"


class MissingExtensionError(RuntimeError):
    """Raised when an op of Detectron2's C++ extension is used but no compiled ``_C`` exists."""


class _MissingExtension(types.ModuleType):
    """Stand-in for ``detectron2._C``: every attribute is a callable that raises."""

    __smallbn_stub__ = True

    # Informational functions, called by detectron2.utils.collect_env: they report the stub.
    @staticmethod
    def get_compiler_version() -> str:
        return "none: detectron2._C is smallbn_d2.compat's stub (no compiled extension)"

    @staticmethod
    def get_cuda_version() -> str:
        return "none: detectron2._C is smallbn_d2.compat's stub (no compiled extension)"

    @staticmethod
    def has_cuda() -> bool:
        return False

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise MissingExtensionError(
                f"detectron2._C.{name} is not available: this detectron2 was installed from the "
                "pb1-detectron2 sdist without its C++ extension, so rotated boxes, rotated "
                "RoIAlign, deformable convolution and the fast COCO evaluation cannot run. Use "
                "an official detectron2 source build (with a compiled detectron2._C) for them."
            )

        missing.__name__ = name
        return missing


class _FallbackFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``detectron2._C`` only when nothing before it on ``sys.meta_path`` did."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _EXTENSION:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, origin="smallbn_d2.compat (stub)")

    def create_module(self, spec):
        return _MissingExtension(spec.name)

    def exec_module(self, module):
        pass


def _install_extension_fallback() -> None:
    if not any(isinstance(f, _FallbackFinder) for f in sys.meta_path):
        sys.meta_path.append(_FallbackFinder())


def _install_numpy_aliases() -> None:
    import numpy as np

    for name, builtin in (("int", int), ("float", float), ("bool", bool)):
        if name not in np.__dict__:
            setattr(np, name, builtin)


def _install_pillow_aliases() -> None:
    from PIL import Image

    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR


def install() -> None:
    """Apply the three fixes above. Idempotent; raises nothing.

    Must run before ``detectron2.data`` is imported (Pillow default argument); ``import
    smallbn_d2`` does this first.
    """
    _install_extension_fallback()
    _install_numpy_aliases()
    _install_pillow_aliases()


def has_compiled_ops() -> bool:
    """True if ``detectron2._C`` is a compiled extension, False if it is the stub above."""
    import detectron2._C as ext

    return not getattr(ext, "__smallbn_stub__", False)


def fix_retinanet_norm_probe() -> None:
    """Let Detectron2 v0.6's ``RetinaNetHead`` be built with ``MODEL.RETINANET.NORM: "GN"``.

    v0.6's ``RetinaNetHead.__init__`` calls ``get_norm(norm, 1)`` for any norm other than
    "BN"/"SyncBN", only to log the layer's type; torch >= 1.13 rejects ``GroupNorm(32, 1)``
    (1 channel is not divisible by 32 groups), so a GN RetinaNet head cannot be built. Later
    Detectron2 versions probe with 32 channels; this does the same by rebinding the name
    ``get_norm`` in ``detectron2.modeling.meta_arch.retinanet`` only (the head's real layers
    have ``MODEL.FPN.OUT_CHANNELS`` channels and are unaffected). Idempotent; raises nothing.

    Imports ``detectron2.modeling`` (hence ``detectron2.data``): ``import smallbn_d2`` calls it
    after the datasets root is set.
    """
    from detectron2.modeling.meta_arch import retinanet

    probed = retinanet.get_norm
    if getattr(probed, "__smallbn_probe_fix__", False):
        return

    def get_norm(norm, out_channels):
        return probed(norm, 32 if out_channels == 1 else out_channels)

    get_norm.__smallbn_probe_fix__ = True
    get_norm.__doc__ = probed.__doc__
    retinanet.get_norm = get_norm
