"""smallbn_d2: Cross-Iteration BN (CBN) and Moving Average BN (MABN) for Detectron2."""
from setuptools import find_packages, setup

setup(
    name="smallbn_d2",
    version="0.1.0",
    description="CBN and MABN normalization for Detectron2 at small per-GPU batch sizes",
    # the library only: benchmarks/, tools/ and projects/ run from a checkout
    packages=find_packages(include=("smallbn_d2", "smallbn_d2.*")),
    # the COCO 2017 sample of the main job (smallbn_d2/data/coco_2017_sample)
    package_data={"smallbn_d2.data": ["coco_2017_sample/*.md", "coco_2017_sample/annotations/*.json",
                                      "coco_2017_sample/train2017/*.jpg", "coco_2017_sample/val2017/*.jpg"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.1", "fvcore", "pycocotools"],
)
