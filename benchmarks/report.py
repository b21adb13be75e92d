"""The detector-level Markdown report: one section per setting (header, table, summary)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from .measure import command_line, fmt_ratio, fmt_seconds, machine_description, markdown_table, median
from .settings import CONVERTED_TOLERANCE, INFERENCE_SAME_AS, NO_FROZEN_FORM, SUMMARY_NORMS, TARGETS

__all__ = ["paired_ratio", "inference_summary", "build_report"]

_TITLES = {"1x": "`1x`: frozen-BN backbone, norm in FPN, box and mask heads",
           "scratch_3x": "`scratch_3x`: norm everywhere (backbone, FPN, heads)"}


_MEMORY = {"cpu": "peak resident memory", "cuda": "peak CUDA tensor memory (torch.cuda.max_memory_allocated)"}


def paired_ratio(rounds: Sequence[Sequence[float]], bn_rounds: Sequence[Sequence[float]]) -> Optional[float]:
    """Median over (round, step) of a norm's step time over BN's time of the same step.

    Args:
        rounds: per round, the norm's step times (s).
        bn_rounds: per round, BN's step times (s) of the same steps.
    Returns:
        the median ratio; None without BN times (no pairs).
    """
    ratios = [t / b for ts, bs in zip(rounds, bn_rounds) for t, b in zip(ts, bs)]
    return median(ratios) if ratios else None


def inference_summary(times: Optional[Dict[str, List[float]]], norm: str) -> Dict[str, Optional[float]]:
    """Median s/image of ``norm`` in eval mode and converted, and the median over (image, repeat)
    of its time divided by BN's eval-mode time on the same image and repeat (paired ratios).

    Args:
        times: ``{"<row>|eval"|"<row>|converted": [s per (image, repeat)]}`` of an inference child
            (None or empty: no inference timing).
        norm: the row.
    Returns:
        ``{"eval", "conv", "eval_ratio", "conv_ratio"}``, each None where not measured.
    """
    out = {"eval": None, "conv": None, "eval_ratio": None, "conv_ratio": None}
    if not times:
        return out
    bn = times.get("BN|eval")
    for kind, key in (("eval", "eval"), ("converted", "conv")):
        ts = times.get(f"{norm}|{kind}")
        if ts:
            out[key] = median(ts)
            if bn:
                out[key + "_ratio"] = median([t / b for t, b in zip(ts, bn)])
    return out


def _aggregate(args, setting: str, results: Dict, mem: Dict, infer: Dict) -> Dict[str, Dict]:
    """Per row of ``setting`` that has any measurement: median train s/iter, paired ratio to BN,
    peak memory (bytes), non-finite losses and :func:`inference_summary`."""
    agg = {}
    for norm in args.norms:
        rs = results.get((setting, norm), [])
        if not rs and (setting, norm) not in mem and setting not in infer:
            continue
        a = {
            "train": median([t for r in rs for t in r["train_times"]]) if rs else None,
            "train_ratio": paired_ratio([r["train_times"] for r in rs],
                                        [r["train_times"] for r in results.get((setting, "BN"), [])]),
            "mem": mem.get((setting, norm)),
            "nonfinite": sum(r["nonfinite_losses"] for r in rs),
        }
        a.update(inference_summary((infer.get(setting) or {}).get("times"), INFERENCE_SAME_AS.get(norm, norm)))
        agg[norm] = a
    return agg


def _row(norm: str, a: Dict, base: Dict) -> List[str]:
    """One table row: train s/iter and ratio, memory MiB and ratio, inference eval and converted."""
    same = INFERENCE_SAME_AS.get(norm)
    if a["conv"] is not None:
        converted = fmt_seconds(a["conv"]) + (f" (= {same})" if same else "")
    else:
        converted = f"n/a ({norm} has no FrozenBN form)" if norm in NO_FROZEN_FORM else "n/a"
    return [
        norm,
        fmt_seconds(a["train"]), "n/a" if a["train_ratio"] is None else f"{a['train_ratio']:.2f}x",
        "n/a" if a["mem"] is None else f"{a['mem'] / 2**20:.0f}",
        "n/a" if a["mem"] is None or base.get("mem") is None else fmt_ratio(a["mem"], base["mem"]),
        fmt_seconds(a["eval"]) + (f" (= {same})" if same and a["eval"] is not None else ""),
        "n/a" if a["eval_ratio"] is None else f"{a['eval_ratio']:.3f}x",
        converted,
        "n/a" if a["conv_ratio"] is None else f"{a['conv_ratio']:.3f}x",
    ]


def _summary_line(setting: str, norm: str, agg: Dict[str, Dict]) -> str:
    """The summary of a :data:`~.settings.SUMMARY_NORMS` row: ratios to BN and the targets."""
    a, base = agg[norm], agg["BN"]
    tgt = TARGETS.get((setting, norm))
    items = []
    if a["train_ratio"] is not None:  # timed
        t_r = a["train_ratio"]
        item = f"training {t_r:.2f}x BN"
        if tgt:
            item += f" (target <= {tgt[0]:.2f}x: {'met' if t_r <= tgt[0] else 'NOT met'})"
        if "floor" in agg and norm == "CBN" and agg["floor"]["train_ratio"]:
            item += f"; floor (BN + d nu/d theta conv) {agg['floor']['train_ratio']:.2f}x"
        items.append(item)
    if a["mem"] is not None and base.get("mem"):
        m_r = a["mem"] / base["mem"]
        item = f"memory {m_r:.2f}x"
        if tgt:
            item += f" (target <= {tgt[1]:.2f}x: {'met' if m_r <= tgt[1] else 'NOT met'})"
        items.append(item)
    if a["conv_ratio"] is not None and norm not in INFERENCE_SAME_AS:
        c_r = a["conv_ratio"]
        items.append(f"converted inference {c_r:.3f}x BN eval (target within {CONVERTED_TOLERANCE:.0%}: "
                     f"{'met' if abs(c_r - 1) <= CONVERTED_TOLERANCE else 'NOT met'}; converted BN "
                     f"{base['conv_ratio']:.3f}x)")
    return f"- {setting} {norm}: " + ", ".join(items) + "."


def build_report(args, setting: str, results: Dict, mem: Dict, infer: Dict, load_before: str, load_after: str,
                 started: float, finished: float) -> str:
    """The Markdown report of one setting: header (command, machine, method), table, summary.

    Args:
        args: the benchmark's options (``norms``, ``config_file``, ``images``, sizes, counts, ``clock``).
        setting: the setting reported.
        results: ``{(setting, row): [{"train_times": [s], "nonfinite_losses": n} per round]}``.
        mem: ``{(setting, row): peak bytes}``.
        infer: ``{setting: result of an inference child}``.
        load_before, load_after: load averages at the start and the end (text).
        started, finished: ``time.time()`` at the start and the end of the run.
    Returns:
        the section's Markdown text (no BEGIN/END markers).
    """
    title = _TITLES.get(setting, setting)
    parts = [
        f"### Detector level, {title}. "
        f"{'Mask R-CNN R50-FPN, 4conv1fc box head' if args.config_file is None else args.config_file}, "
        f"{args.images} images per iteration, {args.device.upper()}",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Machine: {machine_description(args.device)}; load average (1/5/15 min) {load_before} at the start, "
        f"{load_after} at the end; "
        f"run took {(finished - started) / 60:.0f} min.",
        "",
        f"Images: shorter side {args.min_size} (longest <= {args.max_size}). Training ({args.clock} clock): one "
        "process per setting holds every model and steps them in rotating order on the same batches; s/iter is "
        "the median of "
        f"{args.iters} steps x {args.rounds} round(s) after {args.warmup} warm-up steps, starting at iteration "
        f"{args.start_iter}, and 'vs BN' the median of the paired per-step ratios to BN. Inference ({args.clock} "
        "clock): one process per setting holds every model, in eval "
        "mode and after `convert_to_frozen_bn`, built with the same seed, and runs them in rotating order on each of "
        f"{args.infer_images} val images x {args.infer_repeats} repeats; s/img is the median, 'vs BN eval' the "
        "median of "
        f"the paired per-image ratios to BN in eval mode. Memory: {_MEMORY[args.device]} during a training step "
        "above the process before the model was built (model, gradients, optimizer state, buffers, activations), "
        f"max over {args.memory_iters} steps after the warm-up, fresh subprocess per row.",
    ]
    agg = _aggregate(args, setting, results, mem, infer)
    base = agg.get("BN", {})
    rows = [_row(norm, a, base) for norm, a in agg.items()]
    summary = [f"- WARNING {setting}/{norm}: {a['nonfinite']} step(s) with non-finite loss."
               for norm, a in agg.items() if a["nonfinite"]]
    parts += ["", markdown_table(
        ["norm", "train s/iter", "vs BN", "peak memory MiB", "vs BN", "inference s/img (eval)", "vs BN eval",
         "converted s/img", "vs BN eval"], rows)]
    if "BN" in agg:
        summary += [_summary_line(setting, norm, agg) for norm in SUMMARY_NORMS if norm in agg]
        if "GN" in agg and agg["GN"]["eval_ratio"] is not None:
            summary.append(f"- {setting} GN: inference {agg['GN']['eval_ratio']:.2f}x BN eval "
                           "(the papers: about 1.7x on GPUs).")
    counts = (infer.get(setting) or {}).get("detections") or {}
    if len(set(counts.values())) > 1:
        summary.append("- WARNING: the models returned different numbers of detections on the first image "
                       f"({counts}); their inference times are not comparable.")
    elif counts:
        summary.append(f"- Every model returned {next(iter(counts.values()))} detections on the first image "
                       "(inference cost grows with the detections: the mask head runs on each).")
    parts += [""] + summary
    return "\n".join(parts)
