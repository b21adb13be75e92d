"""A tiny Mask R-CNN R18-FPN with CBN in the FPN and the heads, as a LazyConfig, for tests on CPU.

The LazyConfig counterpart of tiny-mask_rcnn.yaml (small channels, 4conv1fc box head, few
proposals and RoIs, 128-192 px images), built on Detectron2's model-zoo LazyConfigs
common/models/mask_rcnn_fpn.py, common/data/coco.py, common/optim.py and common/train.py.
Trained from scratch (backbone FrozenBN with its identity initialization, nothing frozen) on the
COCO 2017 sample shipped with smallbn_d2 (coco_2017_sample_train / _val, registered by
tools/lazyconfig_train_net.py), 2 images per iteration. CBN: window size k = 4, no burn-in, so
that the first iterations already use the window.
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from fvcore.common.param_scheduler import MultiStepParamScheduler

from smallbn_d2.lazy import model_zoo_config

model = model_zoo_config("common/models/mask_rcnn_fpn.py").model
dataloader = model_zoo_config("common/data/coco.py").dataloader
optimizer = model_zoo_config("common/optim.py").SGD
train = model_zoo_config("common/train.py").train

_NORM = "CBN"
_FPN = 32  # FPN channels

# R18 backbone (BasicBlock stages), trained from scratch
model.backbone.bottom_up.stages.depth = 18
del model.backbone.bottom_up.stages.stride_in_1x1  # a bottleneck option; BasicBlock has none
model.backbone.bottom_up.freeze_at = 0
model.backbone.out_channels = _FPN
model.backbone.norm = _NORM
# RPN: few proposals
model.proposal_generator.head.in_channels = _FPN
model.proposal_generator.pre_nms_topk = (100, 100)
model.proposal_generator.post_nms_topk = (50, 50)
model.proposal_generator.batch_size_per_image = 64
# RoI heads: few RoIs, thin 4conv1fc box head and 4-conv mask head
model.roi_heads.batch_size_per_image = 16
model.roi_heads.box_head.input_shape = ShapeSpec(channels=_FPN, height=7, width=7)
model.roi_heads.box_head.conv_dims = [_FPN] * 4
model.roi_heads.box_head.fc_dims = [64]
model.roi_heads.box_head.conv_norm = _NORM
model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=64)
model.roi_heads.box_predictor.test_topk_per_image = 50
model.roi_heads.mask_head.input_shape = ShapeSpec(channels=_FPN, width=14, height=14)
model.roi_heads.mask_head.conv_dims = [_FPN] * 5  # 4 convs, then the deconv
model.roi_heads.mask_head.conv_norm = _NORM

smallbn = dict(norms=dict(CBN=dict(window_size=4, burn_in=0)))

# data: the COCO 2017 sample, 128-192 px, 2 images per iteration, in the main process
dataloader.train.dataset.names = "coco_2017_sample_train"
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(128,), sample_style="choice", max_size=192),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 0
dataloader.test.dataset.names = "coco_2017_sample_val"
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=128, max_size=192)]
dataloader.test.num_workers = 0

optimizer.lr = 0.005
# LR x 0.1 for the last quarter of train.max_iter (the schedule is relative to it)
lr_multiplier = L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[3, 4])

train.device = "cpu"
train.max_iter = 20
train.eval_period = 0  # evaluation only after the last iteration
train.log_period = 1
train.checkpointer = dict(period=100000, max_to_keep=1)
train.output_dir = "./output/tiny_mask_rcnn_CBN_lazy"
