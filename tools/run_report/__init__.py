"""Run reports of the training tools, beside them and not installed with smallbn_d2: runs read back
(:mod:`.run_metrics`), compared in tables and plots (:mod:`.compare`, :mod:`.published`) by
tools/compare_runs.py, and the end-of-run summary of tools/train_net.py (:mod:`.summary`)."""
