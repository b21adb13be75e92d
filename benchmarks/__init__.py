"""Benchmarks of the normalization layers, driven by ``tools/benchmark_norms.py`` (detector
level) and ``tools/benchmark_cbn_layer.py`` (block level).

* :mod:`.measure`: timing, peak memory (resident; CUDA's on a GPU), child processes, machine description,
  Markdown tables and the sections of docs/BENCHMARKS.md (shared by both levels);
* :mod:`.settings`: what is measured: the rows (norms and variants), the detector settings,
  their configs and the targets;
* :mod:`.floor`: the ``BNFloor`` norm of the detector-level ``floor`` row;
* :mod:`.children`: what runs in a detector-level child process (interleaved training,
  memory, interleaved inference);
* :mod:`.runner`: the detector-level orchestration (which children, collecting their results);
* :mod:`.report`: the detector-level Markdown report;
* :mod:`.layer`: the block-level benchmark.

Both run on the CPU or, with ``--device cuda``, on a GPU (``tools/gpu_check.sh`` runs them so).

Not part of the installed package (setup.py ships ``smallbn_d2`` only): the tools run from a
checkout and put the repository root on ``sys.path``, as Detectron2's own ``tools/`` do.
This ``__init__`` imports none of the modules; the measuring modules import Detectron2 only
inside the functions that need it.
"""
