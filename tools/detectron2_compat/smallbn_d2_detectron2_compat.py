"""Start-up compatibility fixes for a Detectron2 installed without its C++ extension.

``tools/install_detectron2.py`` installs Detectron2 v0.6 from the ``pb1-detectron2`` sdist, which
lacks the C++ sources of ``detectron2._C``; v0.6 also predates current NumPy and Pillow. It
installs this module next to Detectron2 (top level of the environment's site-packages) together
with ``smallbn_d2_detectron2_compat.pth``, whose one line ``import smallbn_d2_detectron2_compat;
smallbn_d2_detectron2_compat.install()`` runs at interpreter start-up. Any program in that
environment can then use Detectron2 without importing smallbn_d2 first.

At start-up :func:`install` only puts one small finder, :class:`Detectron2ImportHook`, first on
``sys.meta_path``; it imports nothing (no NumPy, no Pillow) and answers every other import with
"not mine" after two string comparisons. When the top-level name ``detectron2`` is imported for the
first time it applies, once:

1. **``detectron2._C`` fallback.** :class:`ExtensionFallbackFinder` is appended at the *end* of
   ``sys.meta_path``, so it is consulted only when no other finder finds ``detectron2._C``: a
   compiled extension always wins and is used untouched. Without one, ``import
   detectron2.layers`` works and the ops that need ``_C`` (rotated boxes, rotated RoIAlign,
   deformable convolution on CUDA; the fast COCO evaluation, but see item 4) raise
   :class:`MissingExtensionError` naming the op when called; ``get_compiler_version``,
   ``get_cuda_version`` and ``has_cuda`` report the stub. The stub module carries
   ``__smallbn_stub__ = True`` (read by ``smallbn_d2.compat.has_compiled_ops``).
2. **NumPy aliases.** NumPy >= 1.24 removed ``np.int``, ``np.float`` and ``np.bool``, which v0.6
   still uses; they are restored as the builtins they always aliased (only where missing).
3. **Pillow alias.** Pillow >= 10 removed ``Image.LINEAR`` (a default argument in v0.6's
   transforms); it is restored as ``Image.BILINEAR``, the filter it always named.

Later, when ``detectron2.evaluation.fast_eval_api`` is imported (by
``detectron2.evaluation``), one more fix follows its import (the hook wraps that module's loader):

4. **COCO evaluation without ``_C``.** ``COCOEvaluator`` evaluates with ``fast_eval_api.COCOeval_opt``
   by default (``use_fast_impl=True``), whose ``evaluate``/``accumulate`` are ``_C`` kernels. If
   the module got the stub ``_C``, its ``COCOeval_opt`` is replaced by
   :class:`PycocotoolsCOCOeval`, pycocotools' ``COCOeval`` unchanged (same AP as
   ``use_fast_impl=False``; slower), which logs once that the fast path is replaced. So every
   ``COCOEvaluator``, whoever builds it (LazyConfig model-zoo files, ``DefaultTrainer``,
   Detectron2's ``tools/train_net.py``), evaluates. With a compiled ``_C`` the module is left
   untouched.

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
    "fix_fast_eval_api",
    "install",
    "DISABLE_ENV",
]

#: Environment variable: "0" disables :func:`install` (nothing is put on ``sys.meta_path``).
DISABLE_ENV = "SMALLBN_D2_DETECTRON2_COMPAT"

_EXTENSION = "detectron2._C"
_FAST_EVAL = "detectron2.evaluation.fast_eval_api"
_COCO_EVALUATION = "detectron2.evaluation.coco_evaluation"
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


_PYCOCOTOOLS_CLASSES = {}


def _pycocotools_cocoeval():
    """:class:`PycocotoolsCOCOeval`, defined on first use (pycocotools is imported only then)."""
    if "class" not in _PYCOCOTOOLS_CLASSES:
        import logging

        from pycocotools.cocoeval import COCOeval

        class PycocotoolsCOCOeval(COCOeval):
            """pycocotools' ``COCOeval``, unchanged, standing in for Detectron2's ``COCOeval_opt``
            where ``detectron2._C`` is the stub: same constructor ``(cocoGt, cocoDt, iouType)``,
            same ``evaluate``/``accumulate``/``summarize`` and so the same AP as
            ``COCOEvaluator(..., use_fast_impl=False)``. The first construction in a process
            logs (INFO, logger ``detectron2.evaluation.fast_eval_api``) that the fast path is
            replaced. Raises what ``COCOeval`` raises."""

            _logged = False

            def __init__(self, *args, **kwargs):
                if not PycocotoolsCOCOeval._logged:
                    PycocotoolsCOCOeval._logged = True
                    logging.getLogger(_FAST_EVAL).info(
                        "detectron2._C is not compiled (stub of smallbn_d2_detectron2_compat): COCO "
                        "evaluation uses pycocotools' COCOeval instead of the fast COCOeval_opt "
                        "(same AP, slower)")
                super().__init__(*args, **kwargs)

        PycocotoolsCOCOeval.__module__ = __name__
        PycocotoolsCOCOeval.__qualname__ = "PycocotoolsCOCOeval"
        _PYCOCOTOOLS_CLASSES["class"] = PycocotoolsCOCOeval
    return _PYCOCOTOOLS_CLASSES["class"]


def __getattr__(name):  # PycocotoolsCOCOeval (not in __all__): pycocotools is imported on first access only
    if name == "PycocotoolsCOCOeval":
        return _pycocotools_cocoeval()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fix_fast_eval_api(module) -> bool:
    """Replace ``module.COCOeval_opt`` (``module``: ``detectron2.evaluation.fast_eval_api``) by
    :class:`PycocotoolsCOCOeval` if the ``_C`` it imported is the stub; also in
    ``detectron2.evaluation.coco_evaluation`` when that module is loaded already and holds the
    replaced class (it binds the name at its import).

    Returns True if replaced, False (nothing changed) with a compiled ``_C``. Idempotent; raises
    nothing.
    """
    ext = getattr(module, "_C", None) or sys.modules.get(_EXTENSION)
    if not getattr(ext, "__smallbn_stub__", False):
        return False
    original = module.__dict__.get("COCOeval_opt")
    replacement = _pycocotools_cocoeval()
    if original is replacement:
        return True
    module.COCOeval_opt = replacement
    evaluation = sys.modules.get(_COCO_EVALUATION)
    if evaluation is not None and original is not None and evaluation.__dict__.get("COCOeval_opt") is original:
        evaluation.COCOeval_opt = replacement
    return True


class _FixAfterExec:
    """Loader wrapper: runs the real loader, then ``fix(module)``; the module keeps the real
    loader as ``__loader__`` and ``__spec__.loader``."""

    def __init__(self, loader, fix):
        self.loader = loader
        self.fix = fix

    def create_module(self, spec):
        create = getattr(self.loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module):
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        self.fix(module)

    def __getattr__(self, name):  # get_source, get_filename, is_package, ...
        if name in ("loader", "fix"):  # not set yet (e.g. a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


class Detectron2ImportHook:
    """First on ``sys.meta_path``: applies the fixes when ``detectron2`` is first imported.

    ``find_spec`` returns None for every name but ``detectron2.evaluation.fast_eval_api`` (the
    normal finders then find Detectron2); for the name ``detectron2`` it first calls
    :meth:`apply` once. For ``detectron2.evaluation.fast_eval_api`` it returns the spec the
    other finders give, with a loader that applies :func:`fix_fast_eval_api` after the module
    ran.
    """

    def __init__(self):
        self.applied = False

    def find_spec(self, fullname, path=None, target=None):
        """Apply the fixes on the first lookup of ``detectron2``; wrap the loader of
        ``detectron2.evaluation.fast_eval_api``; otherwise find nothing."""
        if fullname == "detectron2" and not self.applied:
            self.apply()
        elif fullname == _FAST_EVAL:
            return self._spec_fixed_after_exec(fullname, path, target)
        return None

    def _spec_fixed_after_exec(self, fullname, path, target):
        """The spec of ``fullname`` from the finders after this one, its loader wrapped."""
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, ExtensionFallbackFinder):
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _FixAfterExec(spec.loader, fix_fast_eval_api)
                return spec
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
