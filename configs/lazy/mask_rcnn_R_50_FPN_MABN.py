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
from smallbn_d2.compat import has_compiled_ops
from smallbn_d2.lazy import model_zoo_config

_base = model_zoo_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py")
model = _base.model
dataloader = _base.dataloader
optimizer = _base.optimizer
lr_multiplier = _base.lr_multiplier
train = _base.train

_NORM = "MABN"
model.backbone.norm = _NORM  # FPN lateral and output convs
model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]  # 4conv1fc box head
model.roi_heads.box_head.fc_dims = [1024]
model.roi_heads.box_head.conv_norm = _NORM
model.roi_heads.mask_head.conv_norm = _NORM
# pycocotools' COCOeval where Detectron2's compiled extension is absent (same AP)
dataloader.evaluator.use_fast_impl = has_compiled_ops()

smallbn = dict(
    norms=dict(MABN=dict(buffer_size=32, momentum=0.98)),
    head_norms=dict(MABN=dict(warmup_iters=10000)),
)
