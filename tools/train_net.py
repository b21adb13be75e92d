#!/usr/bin/env python
"""Train and evaluate a Detectron2 model with smallbn_d2's norms (CBN, NaiveCBN, MABN).

Detectron2's usual command line::

    python tools/train_net.py --config-file configs/.../x.yaml [--num-gpus N] [--resume]
        [--eval-only] [--allow-existing-output-dir] [KEY VALUE ...]

With ``MODEL.DEVICE cpu``, ``--num-gpus N`` starts N CPU processes with the gloo backend
(``smallbn_d2.engine.launch``; synchronized BN on CPU is "naiveSyncBN"). Bad input (config
values, norm names, dataset paths, output dir, checkpoint shapes) is reported as one clear
message before training starts.

A new run refuses a non-empty OUTPUT_DIR (``--resume`` continues the run there,
``--allow-existing-output-dir`` overrides). Datasets: the COCO 2017 sample shipped with
smallbn_d2 (``coco_2017_sample_train``/``_val``, registered here); Detectron2's builtin names
(``coco_2017_train``, ...) under ``$DETECTRON2_DATASETS``. A training run ends with a short
summary: AP per test set (a test set that is also a training set is a fit check, not accuracy),
the training loss early and late, wall time, outputs, and the command that compares runs.
"""
import os
import sys
import time

import smallbn_d2  # noqa: F401  (first: compatibility fixes, norm names)
from detectron2.engine import default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from smallbn_d2.checkpoint import NormCheckpointer
from smallbn_d2.data import check_datasets_exist, register_coco_sample
from smallbn_d2.engine import (USER_ERRORS, Trainer, check_norm_names, check_output_dir, load_config, setup_cpu,
                               training_argument_parser)
from smallbn_d2.engine.launch import check_cpu_distributed, launch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run_report/, also when loaded by importlib
from run_report.summary import eval_summary, run_summary  # noqa: E402


EXAMPLES = """
Examples:

The main job (Mask R-CNN R18-FPN with CBN on the COCO 2017 sample shipped with smallbn_d2):
    $ python tools/train_net.py --config-file configs/quick/mask_rcnn_R_18_FPN_CBN_small_cpu.yaml

Change some config options (YACS overrides are KEY VALUE pairs):
    $ python tools/train_net.py --config-file configs/quick/mask_rcnn_R_18_FPN_CBN_small_cpu.yaml \\
        SOLVER.MAX_ITER 20 MODEL.CBN.WINDOW_SIZE 4 OUTPUT_DIR output/short_run

Evaluate a trained model:
    $ python tools/train_net.py --config-file configs/quick/mask_rcnn_R_18_FPN_CBN_small_cpu.yaml --eval-only \\
        MODEL.WEIGHTS output/short_run/model_final.pth OUTPUT_DIR output/short_run_eval

Train a zoo config on 8 GPUs with the real COCO under $DETECTRON2_DATASETS:
    $ python tools/train_net.py --num-gpus 8 \\
        --config-file configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_CBN_1x.yaml
"""


def setup(args):
    """Create the config from ``args`` and run Detectron2's ``default_setup`` (logging, dumps)."""
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # smallbn_d2's own messages (burn-in length, wiring, warnings) go to log.txt too.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="smallbn_d2")
    return cfg


def main(args):
    start = time.perf_counter()
    register_coco_sample()  # in every launched process (each is a new interpreter)
    cfg = setup(args)
    setup_cpu(cfg.MODEL.DEVICE)
    check_datasets_exist(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    if args.eval_only:
        model = Trainer.build_model(cfg)
        NormCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
            print(eval_summary(cfg, res, time.perf_counter() - start), flush=True)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    result = trainer.train()
    if comm.is_main_process():
        compare_tool = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compare_runs.py")
        print(run_summary(cfg, time.perf_counter() - start, sys.executable, compare_tool), flush=True)
    return result


def cli():
    args = training_argument_parser("OUTPUT_DIR", description=__doc__.split("\n\n")[0],
                                    examples=EXAMPLES).parse_args()
    try:
        register_coco_sample()  # coco_2017_sample_train / _val, before anything is built
        # Checked once, before any process starts or writes to OUTPUT_DIR.
        cfg = load_config(args.config_file, args.opts)
        check_output_dir(cfg.OUTPUT_DIR, resume=args.resume, eval_only=args.eval_only,
                         allow_existing=args.allow_existing_output_dir, weights=cfg.MODEL.WEIGHTS)
        check_norm_names(cfg)
        check_cpu_distributed(cfg, args.num_gpus * args.num_machines)
        check_datasets_exist(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
        print("Command Line Args:", args)
        # MODEL.DEVICE "cpu": --num-gpus N gloo processes (smallbn_d2.engine.launch); else Detectron2's launch
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,), device=cfg.MODEL.DEVICE)
    except USER_ERRORS as e:  # bad input: a clear message, no traceback
        sys.exit(f"train_net.py: error: {type(e).__name__}: {e}")


if __name__ == "__main__":
    cli()
