"""Mask R-CNN R50-FPN, 1x, with CBN in the FPN, the 4conv1fc box head and the 4-conv mask head.

LazyConfig twin of configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_CBN_1x.yaml, built on
Detectron2's model-zoo LazyConfig COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.py (its
common/models/mask_rcnn_fpn.py model, COCO data, SGD, 1x schedule): ImageNet-pretrained R-50
(MSRA) with a FrozenBN backbone (freeze_at 2), 90k iterations at 16 images, no SyncBN.
Images per GPU: 2 (dataloader.train.total_batch_size 16 on 8 GPUs); nothing rescales with
the number of GPUs here (see smallbn_d2/lazy.py): on N GPUs keep 2 images per GPU by setting
total_batch_size 2N, and scale optimizer.lr, train.max_iter, the schedule and the CBN burn-in
as Detectron2's linear scaling rule says.

CBN: window size k = 8 (8 x 2 images per GPU = 16), burn-in 3 epochs of COCO train2017
(117266 images after removing those without annotations) at 16 images per iteration, in
iterations. Train with tools/lazyconfig_train_net.py.
"""
from smallbn_d2.lazy import burn_in_iterations, mask_rcnn_fpn_1x_with_norm

_base = mask_rcnn_fpn_1x_with_norm("CBN")
model, dataloader, optimizer, lr_multiplier, train = (
    _base.model, _base.dataloader, _base.optimizer, _base.lr_multiplier, _base.train)

smallbn = dict(
    norms=dict(CBN=dict(window_size=8,
                        burn_in=burn_in_iterations(3.0, 117266, dataloader.train.total_batch_size))),
)
