"""Mask R-CNN R50-FPN, 1x, with MABN in the FPN, the 4conv1fc box head and the 4-conv mask head.

LazyConfig twin of configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_MABN_1x.yaml, built on
Detectron2's model-zoo LazyConfig COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py (its
common/models/mask_rcnn_fpn.py model, COCO data, SGD, 1x schedule): ImageNet-pretrained R-50
(MSRA) with a FrozenBN backbone (freeze_at 2), 90k iterations at 16 images, no SyncBN.
Images per GPU: 2 (dataloader.train.total_batch_size 16 on 8 GPUs); nothing rescales with
the number of GPUs here (see smallbn_d2/lazy.py): on N GPUs keep 2 images per GPU by setting
total_batch_size 2N, and scale optimizer.lr, train.max_iter, the schedule and the MABN
iteration counts as Detectron2's linear scaling rule says.

MABN: buffer size m = 32, EMA momentum 0.98; the box and mask heads use the current batch
statistics for their first 10k iterations (warm-up). Weight centralization applies to the convs
that feed MABN layers (FPN and heads). Train with tools/lazyconfig_train_net.py.
"""
from smallbn_d2.lazy import mask_rcnn_fpn_1x_with_norm

_base = mask_rcnn_fpn_1x_with_norm("MABN")
model, dataloader, optimizer, lr_multiplier, train = (
    _base.model, _base.dataloader, _base.optimizer, _base.lr_multiplier, _base.train)

smallbn = dict(
    norms=dict(MABN=dict(buffer_size=32, momentum=0.98)),
    head_norms=dict(MABN=dict(warmup_iters=10000)),
)
