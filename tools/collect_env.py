#!/usr/bin/env python
"""Print the environment report: Detectron2's collect_env table plus smallbn_d2's view.

Says which ``detectron2._C`` is in use (a compiled extension, or smallbn_d2's stub for the
pb1-detectron2 sdist install), the datasets root, and the registered norm names.
"""
import os

import smallbn_d2
from detectron2.utils.collect_env import collect_env_info
from smallbn_d2.compat import has_compiled_ops

if __name__ == "__main__":
    import detectron2._C as C

    print(collect_env_info())
    print(f"smallbn_d2 {smallbn_d2.__version__} @ {os.path.dirname(smallbn_d2.__file__)}")
    print("detectron2._C:", "compiled extension at " + str(getattr(C, "__file__", "?")) if has_compiled_ops()
          else "smallbn_d2.compat stub (no compiled ops: rotated boxes, deformable conv on CUDA, fast COCOeval)")
    print("DETECTRON2_DATASETS:", os.environ.get("DETECTRON2_DATASETS"))
    print("norm names:", ", ".join(smallbn_d2.supported_norms()))
