"""The Markdown report of ``tools/gpu_check.py``: a pure function of the collected results.

:func:`build_report` takes the dict that :mod:`.gpu_check` collects (and writes to
``results.json``) and returns Markdown ready to paste into docs/BENCHMARKS.md: the machine and
command, one line per stage (status, time, limit), the CUDA tests' counts, the AMP training
runs, the block- and detector-level tables on CUDA with the ratios to BN (paired per step, as
the CPU benchmark), the comparison with the CBN paper's Table 6, the multi-GPU step and every
failure. Missing parts (a stage that failed or was skipped) appear as such; nothing raises.

Results layout (``results``)::

    {"command": str, "machine": {"gpus": [name], "gpu_count", "gpu_memory", "driver", "torch",
     "cuda", "python", "cpu_count"}, "started": s, "finished": s, "budget_s": s,
     "stages": [{"name", "title", "status": passed|failed|timeout|skipped, "seconds", "limit_s",
                 "message", "data": {...}}]}

with ``data`` as written by the stage (:mod:`.gpu` for ``block``, ``detector_*``, ``train_*``
and ``ddp``; :func:`.gpu_check.pytest_summary` for ``cuda_tests``; the import check for
``install``). The detector rows' aggregates (medians, paired ratios to BN) are computed by the
measuring child (:func:`.gpu.detector_rows`, with the CPU benchmark's own functions) and stored
in ``data["rows"]``; this module only formats.

Only the standard library is used and nothing else of the package is imported: the report is
written by the GPU machine's own Python, also when the install failed.
"""
from __future__ import annotations

import statistics
from typing import Dict, List, Optional, Sequence

__all__ = ["PAPER_TABLE6", "table", "build_report", "paper_comparison"]

#: CBN paper, Table 6 (Mask R-CNN R50-FPN, 4 images per GPU, k = 4, the authors' GPUs):
#: training and inference speed in iterations/s and memory in the table's units (docs/METHODS.md, CBN 9).
PAPER_TABLE6 = {
    "train_iter_s": {"BN": 1.3, "GN": 1.2, "CBN": 1.0},
    "infer_iter_s": {"BN": 6.2, "GN": 3.7, "CBN": 6.2},
    "memory": {"BN": 14.1, "GN": 14.1, "CBN": 15.1},
}
_STATUS = {"passed": "passed", "failed": "**FAILED**", "timeout": "**TIMED OUT**", "skipped": "skipped"}


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown (pipe) table; ``|`` in cells is escaped. Own code, not tabulate: the
    report is also written by an interpreter where nothing is installed yet."""
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _num(value: Optional[float], fmt: str = "{:.3f}", none: str = "n/a") -> str:
    """``fmt`` of ``value``; ``none`` for None or NaN."""
    return none if value is None or value != value else fmt.format(value)


def _mib(nbytes: Optional[float]) -> str:
    return _num(None if nbytes is None else nbytes / 2**20, "{:.0f}")


def _ratio(value: Optional[float], base: Optional[float]) -> str:
    """``value / base`` as ``"1.23x"``; ``"n/a"`` when either is missing or ``base`` is not > 0."""
    if value is None or base is None or not base > 0 or value != value:
        return "n/a"
    return f"{value / base:.2f}x"


def _stage(results: Dict, name: str) -> Optional[Dict]:
    """The stage record called ``name`` (None if it is not in the results)."""
    return next((s for s in results.get("stages", []) if s.get("name") == name), None)


def _data(stage: Optional[Dict]) -> Dict:
    return (stage or {}).get("data") or {}


def _status_line(stage: Optional[Dict]) -> str:
    """``"passed"`` or ``"**FAILED**: message"`` etc. for a stage record."""
    if stage is None:
        return "not run"
    text = _STATUS.get(stage.get("status"), stage.get("status", "?"))
    return f"{text}: {stage['message']}" if stage.get("message") and stage.get("status") != "passed" else text


def _machine_line(m: Dict) -> str:
    gpus = m.get("gpus") or []
    names = ", ".join(sorted(set(gpus))) or "unknown GPU"
    return (f"{m.get('gpu_count', len(gpus))} x {names} ({m.get('gpu_memory', '?')}, driver {m.get('driver', '?')}), "
            f"torch {m.get('torch', '?')}, CUDA {m.get('cuda', '?')}, cuDNN {m.get('cudnn', '?')}, "
            f"Python {m.get('python', '?')}, {m.get('cpu_count', '?')} CPU cores")


# ------------------------------------------------------------------------------------ sections
def _stages_section(results: Dict) -> List[str]:
    rows = []
    for s in results.get("stages", []):
        spent = "-" if s.get("status") == "skipped" else _num(s.get("seconds"), "{:.0f}")
        rows.append([s.get("title", s.get("name")), _status_line(s), spent, _num(s.get("limit_s"), "{:.0f}", "-")])
    return ["#### Stages", "", table(["stage", "status", "time s", "limit s"], rows)]


def _tests_section(results: Dict) -> List[str]:
    st = _stage(results, "cuda_tests")
    summary = _data(st).get("summary")
    return ["#### CUDA tests", "", f"`pytest tests -k cuda`: {summary or 'no pytest summary'}; {_status_line(st)}."]


def _training_section(results: Dict) -> List[str]:
    rows, notes = [], []
    for name in ("train_cbn_amp", "train_mabn_amp"):
        st = _stage(results, name)
        d = _data(st)
        if not d:
            notes.append(f"- {(st or {}).get('title', name)}: {_status_line(st)}")
            continue
        res = d.get("results") or {}
        last = d["losses"][-1][1] if d.get("losses") else None
        rows.append([d.get("norm"), "fp16 (AMPTrainer)" if d.get("amp") else "fp32",
                     f"{d.get('iterations') or 0} / {d.get('max_iter')}", d.get("images_per_iter"), _num(last),
                     "yes" if d.get("all_finite") else "**NO**", _num(d.get("s_per_iter")),
                     _num(d.get("peak_memory_mb"), "{:.0f}"), _num((res.get("bbox") or {}).get("AP"), "{:.2f}"),
                     _num((res.get("segm") or {}).get("AP"), "{:.2f}")])
        if st and st.get("status") != "passed":
            notes.append(f"- {d.get('norm')}: {_status_line(st)}")
    test_set = next((_data(_stage(results, n)).get("test_set") for n in ("train_cbn_amp", "train_mabn_amp")
                     if _data(_stage(results, n)).get("test_set")), "coco_2017_sample_val")
    out = ["#### Training: sample Mask R-CNN R18-FPN (`configs/quick/mask_rcnn_R_18_FPN_CBN_small_cpu.yaml`), "
           "every norm key set to the row's norm, `SOLVER.AMP.ENABLED True`", "",
           "CBN burn-in and MABN's warm-ups end after a third of the run. AP: the final COCO evaluation on "
           f"`{test_set}` (24 images; a short run from scratch: the figure shows the evaluation runs, not accuracy)."]
    if rows:
        out += ["", table(["norm", "precision", "iterations", "images/iter", "last total_loss", "losses finite",
                           "s/iter", "peak GPU memory MiB", "box AP", "mask AP"], rows)]
    return out + ([""] + notes if notes else [])


def _block_section(results: Dict) -> List[str]:
    st = _stage(results, "block")
    d = _data(st)
    out = ["#### Block level on CUDA"]
    if not d.get("times"):
        return out + ["", f"No result: {_status_line(st)}."]
    t = {n: statistics.median(v) if v else None for n, v in d["times"].items()}
    mem = d.get("peak_bytes") or {}
    state = d.get("state_bytes") or {}
    rows = [[n, (d.get("descriptions") or {}).get(n, n), _num(None if t[n] is None else t[n] * 1e3, "{:.2f}"),
             _ratio(t[n], t.get("BN")), _mib(mem.get(n)), _ratio(mem.get(n), mem.get("BN")),
             _num(None if n not in state else state[n] / 2**20, "{:.1f}")] for n in d["times"]]
    n, c, h, w = d.get("shape", ["?"] * 4)
    return out + [
        "",
        f"{d.get('depth')} x (3x3 conv {c} -> {c}, norm, ReLU) on {n} x {c} x {h} x {w}, forward + backward; "
        f"median over {d.get('rounds')} interleaved rounds of `torch.utils.benchmark.Timer.timeit({d.get('iters')})` "
        f"after {d.get('warmup')} warm-up steps; memory: `torch.cuda.max_memory_allocated` during a "
        f"step above the allocation at its start. TF32: {d.get('tf32')}.",
        "",
        table(["norm", "layer", "fwd+bwd ms/step", "time vs BN", "peak step memory MiB", "memory vs BN",
               "parameters + buffers MiB"], rows),
    ]


def _detector_section(results: Dict, setting: str) -> List[str]:
    st = _stage(results, f"detector_{setting}")
    d = _data(st)
    title = {"1x": "`1x` (frozen-BN backbone, the norm in FPN, box and mask heads: the CBN paper's setting)",
             "scratch_3x": "`scratch_3x` (the norm everywhere)"}.get(setting, setting)
    out = [f"#### Detector level on CUDA, {title}"]
    if not d.get("rows"):
        return out + ["", f"No result: {_status_line(st)}."]
    agg = d["rows"]
    rows = []
    for norm, a in agg.items():
        same = a.get("inference_of")
        conv = "n/a (no FrozenBN form)" if a.get("no_frozen_form") else _num(a["conv"])
        rows.append([norm, _num(a["train"]), _num(1 / a["train"] if a["train"] else None, "{:.2f}"),
                     _num(a["train_ratio"], "{:.2f}x"), _mib(a["mem"]), _num(a["mem_ratio"], "{:.2f}x"),
                     _num(a["eval"]) + (f" (= {same})" if same and a["eval"] is not None else ""),
                     _num(1 / a["eval"] if a["eval"] else None, "{:.1f}"), _num(a["eval_ratio"], "{:.3f}x"),
                     conv, _num(a["conv_ratio"], "{:.3f}x")])
    out += [
        "",
        f"Mask R-CNN R50-FPN, 4conv1fc box head, random initialization, {d.get('images')} images per step of the "
        f"COCO 2017 sample resized to a shorter side of {d.get('min_size')} (longest <= {d.get('max_size')}), "
        f"starting at iteration {d.get('start_iter')}. Training: {d.get('warmup')} warm-up and "
        f"{d.get('memory_iters')} memory steps per model, then {d.get('iters')} timed steps of every model in rotating "
        "order on the same batches; 'vs BN' is the median of the per-step ratios. Memory: "
        "`torch.cuda.max_memory_allocated` during a step above the memory allocated before the model was built. "
        f"Inference: eval mode and after `convert_to_frozen_bn`, {d.get('infer_images')} val images x "
        f"{d.get('infer_repeats')}, models in rotating order. TF32: {d.get('tf32')}.",
        "",
        table(["norm", "train s/iter", "iter/s", "vs BN", "peak memory MiB", "vs BN", "inference s/img (eval)",
               "img/s", "vs BN eval", "converted s/img", "vs BN eval"], rows),
    ]
    warn = [f"- WARNING: {n}: {a['nonfinite']} step(s) with a non-finite loss." for n, a in agg.items() if a["nonfinite"]]
    counts = d.get("detections") or {}
    if len(set(counts.values())) > 1:
        warn.append(f"- WARNING: the models returned different numbers of detections on the first image ({counts}); "
                    "their inference times are not comparable.")
    return out + ([""] + warn if warn else [])


def paper_comparison(d: Dict) -> List[List[str]]:
    """Rows ``[quantity, paper, this run]`` comparing the ``rows`` of a ``1x`` detector result with
    :data:`PAPER_TABLE6`: iterations/s and time ratios to BN (training and inference), memory
    ratio. The paper's speeds are per iteration of 4 images per GPU on its GPUs: the ratios are
    the comparable part."""
    agg = d.get("rows") or {}
    p = PAPER_TABLE6
    rows = []
    # per phase: (speed label, its suffix, time label, paper key, seconds key, ratio key, speed format)
    for speed, suffix, phase, paper, key, ratio, fmt in (
            ("training iter/s", "", "training", "train_iter_s", "train", "train_ratio", "{:.2f}"),
            ("inference img/s", " (eval mode)", "inference", "infer_iter_s", "eval", "eval_ratio", "{:.1f}")):
        for norm in ("BN", "GN", "CBN"):
            seconds = agg.get(norm, {}).get(key)
            rows.append([f"{speed}, {norm}{suffix}", f"{p[paper][norm]:.1f}",
                         _num(1 / seconds if seconds else None, fmt)])
        for norm in ("GN", "CBN"):
            rows.append([f"{phase} time {norm} / BN", f"{p[paper]['BN'] / p[paper][norm]:.2f}",
                         _num(agg.get(norm, {}).get(ratio), "{:.2f}")])
    rows.append(["memory CBN / BN", f"{p['memory']['CBN'] / p['memory']['BN']:.2f}",
                 _num(agg.get("CBN", {}).get("mem_ratio"), "{:.2f}")])
    return rows


def _paper_section(results: Dict) -> List[str]:
    d = _data(_stage(results, "detector_1x"))
    return ["#### Against the CBN paper, Table 6 (Mask R-CNN R50-FPN, 4 images per GPU, k = 4)", "",
            "The paper's speeds were measured on its authors' GPUs; compare the ratios to BN. This run: the `1x` "
            f"detector table above ({d.get('images', '?')} images per step).", "",
            table(["quantity", "paper", "this run"], paper_comparison(d))]


def _ddp_section(results: Dict) -> List[str]:
    st = _stage(results, "ddp")
    d = _data(st)
    out = ["#### Two processes (DDP, NCCL)", ""]
    if st is None or st.get("status") == "skipped" or not d:
        return out + [f"{_status_line(st)}."]
    last = d["losses"][-1][1] if d.get("losses") else None
    return out + [f"{d.get('num_gpus')} processes, {d.get('norm')}, {d.get('iterations') or 0} / {d.get('max_iter')} "
                  f"iterations of {d.get('images_per_iter')} images, last total_loss {_num(last)}, losses finite: "
                  f"{'yes' if d.get('all_finite') else 'NO'}; {_status_line(st)}."]


def _failures(results: Dict) -> List[str]:
    bad = [s for s in results.get("stages", []) if s.get("status") in ("failed", "timeout")]
    if not bad:
        return []
    return ["#### Failures", ""] + [f"- {s.get('title', s.get('name'))}: {_STATUS[s['status']]}: "
                                    f"{s.get('message') or 'see gpu_check.log'}" for s in bad]


def build_report(results: Dict) -> str:
    """The Markdown report of a ``tools/gpu_check.py`` run (see the module docstring).

    Args:
        results: the collected results (layout in the module docstring); any part may be missing.
    Returns:
        Markdown: header (machine, command, duration), stages, CUDA tests, training, block level,
        detector level per setting, the paper comparison, the two-process step, failures.
    """
    m = results.get("machine") or {}
    took = None
    if results.get("started") is not None and results.get("finished") is not None:
        took = results["finished"] - results["started"]
    parts = [
        f"### GPU check: {', '.join(sorted(set(m.get('gpus') or []))) or 'GPU'}",
        "",
        f"Command: `{results.get('command', 'python3 tools/gpu_check.py')}`",
        "",
        f"Machine: {_machine_line(m)}. Run took {_num(took, '{:.0f}')} s of a {_num(results.get('budget_s'), '{:.0f}')} s "
        "budget.",
        "",
    ]
    env = _data(_stage(results, "install"))
    if env.get("versions"):
        v = env["versions"]
        parts += [f"Installed from the wheel folder: Detectron2 {v.get('pb1-detectron2', '?')} (pb1-detectron2, "
                  f"{'with' if env.get('compiled_ops') else 'without'} its compiled ops), fvcore {v.get('fvcore', '?')}, "
                  f"pycocotools {v.get('pycocotools', '?')}; torch {env.get('torch', '?')} from {env.get('torch_path', '?')} "
                  f"(CUDA available: {env.get('cuda_available')}).", ""]
    sections = [_stages_section(results), _tests_section(results), _training_section(results),
                _block_section(results)]
    sections += [_detector_section(results, s) for s in ("1x", "scratch_3x") if _stage(results, f"detector_{s}")]
    sections += [_paper_section(results), _ddp_section(results), _failures(results)]
    for sec in sections:
        if sec:
            parts += sec + [""]
    return "\n".join(parts).rstrip() + "\n"
