#!/usr/bin/env python
"""Train and evaluate a Detectron2 LazyConfig (Python config) model with CBN / NaiveCBN / MABN.

Detectron2's ``tools/lazyconfig_train_net.py`` command line, with smallbn_d2's training flow
(``smallbn_d2.lazy.do_train``: layers built with the config's ``smallbn.norms`` and wired to
their producing convs, ``NormIterationHook`` first, cross-norm checkpoint loading)::

    python tools/lazyconfig_train_net.py --config-file configs/lazy/mask_rcnn_R_50_FPN_CBN.py \\
        [--num-gpus N] [--resume] [--eval-only] [--allow-existing-output-dir] [key=value ...]

Overrides are LazyConfig ``key=value`` pairs (e.g. ``train.max_iter=2``,
``train.output_dir=out``, ``smallbn.norms.CBN.window_size=4``). With ``train.device=cpu``,
``--num-gpus N`` starts N CPU processes (gloo). A new run refuses a non-empty
``train.output_dir`` (``--resume`` continues the run there, ``--allow-existing-output-dir``
overrides). The COCO 2017 sample shipped with smallbn_d2 is registered as
``coco_2017_sample_train``/``_val``. ``--eval-only`` evaluates ``train.init_checkpoint``.

Before any process starts or anything is written, the tool checks the ``smallbn`` field, the norm
names of the model (every ``norm`` / ``*_norm`` field), that the datasets it will read are
registered and their files exist, and the output folder; bad input is reported as one line
(``lazyconfig_train_net.py: error: ...``), as ``tools/train_net.py`` does.
"""
import sys

import smallbn_d2  # noqa: F401  (first: compatibility fixes, norm names)
from detectron2.config import LazyConfig
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from smallbn_d2.checkpoint import NormCheckpointer
from smallbn_d2.data import register_coco_sample
from smallbn_d2.engine.defaults import (USER_ERRORS, ConfigValueError, check_lazy_config, check_output_dir, setup_cpu,
                                        training_argument_parser)
from smallbn_d2.engine.launch import create_ddp_model, launch
from smallbn_d2.lazy import build_model_from_lazy_config, check_smallbn_field, do_test, do_train


EXAMPLES = """
Examples:

Train the tiny CPU config on the shipped COCO sample for 20 iterations:
    $ python tools/lazyconfig_train_net.py --config-file configs/test/tiny_mask_rcnn_CBN_lazy.py \\
        train.max_iter=20 train.output_dir=output/tiny_lazy

Change some config fields (LazyConfig overrides are key=value):
    $ python tools/lazyconfig_train_net.py --config-file configs/lazy/mask_rcnn_R_50_FPN_CBN.py --num-gpus 8 \\
        train.init_checkpoint=/path/to/model.pth optimizer.lr=0.01 smallbn.norms.CBN.window_size=4

Evaluate a trained model:
    $ python tools/lazyconfig_train_net.py --config-file configs/test/tiny_mask_rcnn_CBN_lazy.py --eval-only \\
        train.init_checkpoint=output/tiny_lazy/model_final.pth train.output_dir=output/tiny_lazy_eval
"""


def warn_added_keys(cfg, overrides) -> None:
    """Warn (one stderr line each) of overrides that add a key to ``cfg`` (a LazyConfig, before the
    overrides are applied) instead of changing one: LazyConfig accepts them, and a misspelt
    ``train.max_itr=5`` would otherwise be read by nothing. An argument added to a ``LazyCall``
    node (it has ``_target_``) and keys of the optional ``smallbn`` field (checked by
    ``check_smallbn_field``) are not warned of."""
    import difflib

    from omegaconf import OmegaConf

    absent = object()
    for item in (o for o in overrides if "=" in o):  # the others are refused by apply_overrides
        key = item.split("=", 1)[0].lstrip("+~")
        group, _, leaf = key.rpartition(".")
        if key.split(".")[0] == "smallbn" or OmegaConf.select(cfg, key, default=absent) is not absent:
            continue
        parent = OmegaConf.select(cfg, group, default=None) if group else cfg
        if OmegaConf.is_dict(parent) and "_target_" in parent:
            continue
        close = difflib.get_close_matches(leaf, list(parent.keys()), n=2) if OmegaConf.is_dict(parent) else []
        hint = f"; did you mean {' or '.join(f'{group}.{c}' if group else c for c in close)}?" if close else ""
        print(f"lazyconfig_train_net.py: warning: override {item} adds {key}, which the config does not have{hint}",
              file=sys.stderr)


def load(args, warn: bool = False):
    """The LazyConfig of ``--config-file`` with the command line's overrides applied; ``warn``:
    first warn of overrides that add keys (:func:`warn_added_keys`).

    Raises:
        FileNotFoundError: the config file does not exist.
        ConfigValueError: an override that is not ``key=value`` (the message names it).
    """
    from hydra.errors import HydraException

    cfg = LazyConfig.load(args.config_file)
    if warn:
        warn_added_keys(cfg, args.opts)
    try:
        return LazyConfig.apply_overrides(cfg, args.opts)
    except HydraException as e:
        raise ConfigValueError(f"override {' '.join(str(e).split())}; allowed: key=value, e.g. train.max_iter=100") \
            from None


def main(args):
    register_coco_sample()  # in every launched process (each is a new interpreter)
    cfg = load(args)
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="smallbn_d2")
    setup_cpu(cfg.train.device)
    if args.eval_only:
        model = create_ddp_model(build_model_from_lazy_config(cfg))
        NormCheckpointer(model).load(cfg.train.init_checkpoint)
        return do_test(cfg, model)
    do_train(cfg, resume=args.resume)


def cli():
    args = training_argument_parser("train.output_dir", description=__doc__.split("\n\n")[0],
                                    examples=EXAMPLES, lazy=True).parse_args()
    try:
        if not args.config_file:
            raise ConfigValueError("--config-file is required: a LazyConfig Python file, e.g. "
                                   "configs/test/tiny_mask_rcnn_CBN_lazy.py")
        register_coco_sample()
        cfg = load(args, warn=True)  # checked once, before any process starts or writes
        try:
            check_smallbn_field(cfg)
        except (KeyError, TypeError, ValueError) as e:
            sys.exit(f"lazyconfig_train_net.py: error: {e.args[0] if isinstance(e, KeyError) else e}")
        check_output_dir(cfg.train.output_dir, resume=args.resume, eval_only=args.eval_only,
                         allow_existing=args.allow_existing_output_dir, weights=cfg.train.init_checkpoint)
        check_lazy_config(cfg, eval_only=args.eval_only)  # norm names, datasets registered and present
        print("Command Line Args:", args)
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,), device=cfg.train.device)
    except USER_ERRORS as e:  # bad input: a clear message, no traceback
        sys.exit(f"lazyconfig_train_net.py: error: {type(e).__name__}: {e}")


if __name__ == "__main__":
    cli()
