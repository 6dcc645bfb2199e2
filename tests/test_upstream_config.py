"""Reading test settings from the config text mmdet checkpoints carry, without executing it.

The config texts below are written the way upstream writes them: ``Config.pretty_text`` of mmcv 1.x
(mmdet 2: keys in merge order, tuples and number lists via ``str()``, mappings with dotted keys as
``{...}``) and of mmengine (mmdet 3: keys sorted, every list/tuple item on its own line, ``dict({...})``),
with the values of the public configs they stand for (mmdet's faster_rcnn_r50_fpn / retinanet_r50_fpn /
coco_detection, SR-TOD's AI-TOD test settings, CFINet's SODA-D config, the TinyPerson BH-SSPNet config).
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path
from typing import Any

import pytest

from tod_deploy.errors import UserError
from tod_deploy.upstream_config import ConfigTextError, parse_config_text, test_settings

# mmdet 2.25 faster_rcnn_r50_fpn_1x_coco.py, merged, as tools/train.py stores it in meta['config'].
MMDET2_FASTER_RCNN = """\
model = dict(
    type='FasterRCNN',
    backbone=dict(
        type='ResNet',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        style='pytorch',
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')),
    neck=dict(
        type='FPN',
        in_channels=[256, 512, 1024, 2048],
        out_channels=256,
        num_outs=5),
    rpn_head=dict(
        type='RPNHead',
        in_channels=256,
        feat_channels=256,
        anchor_generator=dict(
            type='AnchorGenerator',
            scales=[8],
            ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32, 64]),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder',
            target_means=[0.0, 0.0, 0.0, 0.0],
            target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(
            type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
    roi_head=dict(
        type='StandardRoIHead',
        bbox_roi_extractor=dict(
            type='SingleRoIExtractor',
            roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0),
            out_channels=256,
            featmap_strides=[4, 8, 16, 32]),
        bbox_head=dict(
            type='Shared2FCBBoxHead',
            in_channels=256,
            fc_out_channels=1024,
            roi_feat_size=7,
            num_classes=80,
            bbox_coder=dict(
                type='DeltaXYWHBBoxCoder',
                target_means=[0.0, 0.0, 0.0, 0.0],
                target_stds=[0.1, 0.1, 0.2, 0.2]),
            reg_class_agnostic=False,
            loss_cls=dict(
                type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type='L1Loss', loss_weight=1.0))),
    train_cfg=dict(
        rpn=dict(
            assigner=dict(
                type='MaxIoUAssigner',
                pos_iou_thr=0.7,
                neg_iou_thr=0.3,
                min_pos_iou=0.3,
                match_low_quality=True,
                ignore_iof_thr=-1),
            sampler=dict(
                type='RandomSampler',
                num=256,
                pos_fraction=0.5,
                neg_pos_ub=-1,
                add_gt_as_proposals=False),
            allowed_border=-1,
            pos_weight=-1,
            debug=False),
        rpn_proposal=dict(
            nms_pre=2000,
            max_per_img=1000,
            nms=dict(type='nms', iou_threshold=0.7),
            min_bbox_size=0),
        rcnn=dict(
            assigner=dict(
                type='MaxIoUAssigner',
                pos_iou_thr=0.5,
                neg_iou_thr=0.5,
                min_pos_iou=0.5,
                match_low_quality=False,
                ignore_iof_thr=-1),
            sampler=dict(
                type='RandomSampler',
                num=512,
                pos_fraction=0.25,
                neg_pos_ub=-1,
                add_gt_as_proposals=True),
            pos_weight=-1,
            debug=False)),
    test_cfg=dict(
        rpn=dict(
            nms_pre=1000,
            max_per_img=1000,
            nms=dict(type='nms', iou_threshold=0.7),
            min_bbox_size=0),
        rcnn=dict(
            score_thr=0.05,
            nms=dict(type='nms', iou_threshold=0.5),
            max_per_img=100)))
dataset_type = 'CocoDataset'
data_root = 'data/coco/'
img_norm_cfg = dict(
    mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', img_scale=(1333, 800), keep_ratio=True),
    dict(type='RandomFlip', flip_ratio=0.5),
    dict(
        type='Normalize',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        to_rgb=True),
    dict(type='Pad', size_divisor=32),
    dict(type='DefaultFormatBundle'),
    dict(type='Collect', keys=['img', 'gt_bboxes', 'gt_labels'])
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='MultiScaleFlipAug',
        img_scale=(1333, 800),
        flip=False,
        transforms=[
            dict(type='Resize', keep_ratio=True),
            dict(type='RandomFlip'),
            dict(
                type='Normalize',
                mean=[123.675, 116.28, 103.53],
                std=[58.395, 57.12, 57.375],
                to_rgb=True),
            dict(type='Pad', size_divisor=32),
            dict(type='ImageToTensor', keys=['img']),
            dict(type='Collect', keys=['img'])
        ])
]
data = dict(
    samples_per_gpu=2,
    workers_per_gpu=2,
    train=dict(
        type='CocoDataset',
        ann_file='data/coco/annotations/instances_train2017.json',
        img_prefix='data/coco/train2017/',
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', with_bbox=True),
            dict(type='Resize', img_scale=(1333, 800), keep_ratio=True),
            dict(type='RandomFlip', flip_ratio=0.5),
            dict(
                type='Normalize',
                mean=[123.675, 116.28, 103.53],
                std=[58.395, 57.12, 57.375],
                to_rgb=True),
            dict(type='Pad', size_divisor=32),
            dict(type='DefaultFormatBundle'),
            dict(type='Collect', keys=['img', 'gt_bboxes', 'gt_labels'])
        ]),
    val=dict(
        type='CocoDataset',
        ann_file='data/coco/annotations/instances_val2017.json',
        img_prefix='data/coco/val2017/',
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(
                type='MultiScaleFlipAug',
                img_scale=(1333, 800),
                flip=False,
                transforms=[
                    dict(type='Resize', keep_ratio=True),
                    dict(type='RandomFlip'),
                    dict(
                        type='Normalize',
                        mean=[123.675, 116.28, 103.53],
                        std=[58.395, 57.12, 57.375],
                        to_rgb=True),
                    dict(type='Pad', size_divisor=32),
                    dict(type='ImageToTensor', keys=['img']),
                    dict(type='Collect', keys=['img'])
                ])
        ]),
    test=dict(
        type='CocoDataset',
        ann_file='data/coco/annotations/instances_val2017.json',
        img_prefix='data/coco/val2017/',
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(
                type='MultiScaleFlipAug',
                img_scale=(1333, 800),
                flip=False,
                transforms=[
                    dict(type='Resize', keep_ratio=True),
                    dict(type='RandomFlip'),
                    dict(
                        type='Normalize',
                        mean=[123.675, 116.28, 103.53],
                        std=[58.395, 57.12, 57.375],
                        to_rgb=True),
                    dict(type='Pad', size_divisor=32),
                    dict(type='ImageToTensor', keys=['img']),
                    dict(type='Collect', keys=['img'])
                ])
        ]))
evaluation = dict(interval=1, metric='bbox')
optimizer = dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=0.0001)
optimizer_config = dict(grad_clip=None)
lr_config = dict(
    policy='step',
    warmup='linear',
    warmup_iters=500,
    warmup_ratio=0.001,
    step=[8, 11])
runner = dict(type='EpochBasedRunner', max_epochs=12)
checkpoint_config = dict(interval=1)
log_config = dict(interval=50, hooks=[dict(type='TextLoggerHook')])
custom_hooks = [dict(type='NumClassCheckHook')]
dist_params = dict(backend='nccl')
log_level = 'INFO'
load_from = None
resume_from = None
workflow = [('train', 1)]
opencv_num_threads = 0
mp_start_method = 'fork'
auto_scale_lr = dict(enable=False, base_batch_size=16)
work_dir = './work_dirs/faster_rcnn_r50_fpn_1x_coco'
auto_resume = False
gpu_ids = [0]
"""

# mmdet 3 Faster R-CNN with SR-TOD's AI-TOD test settings (3000 proposals and detections), a dataset
# that names its classes, as mmengine's Runner stores it in meta['cfg'] (keys sorted at every level).
MMDET3_FASTER_RCNN = """\
auto_scale_lr = dict(base_batch_size=16, enable=False)
backend_args = None
data_root = 'data/AI-TOD/'
dataset_type = 'CocoDataset'
default_hooks = dict(
    checkpoint=dict(interval=1, type='CheckpointHook'),
    logger=dict(interval=50, type='LoggerHook'),
    param_scheduler=dict(type='ParamSchedulerHook'),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    timer=dict(type='IterTimerHook'),
    visualization=dict(type='DetVisualizationHook'))
default_scope = 'mmdet'
env_cfg = dict(
    cudnn_benchmark=False,
    dist_cfg=dict(backend='nccl'),
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0))
launcher = 'none'
load_from = None
log_level = 'INFO'
log_processor = dict(by_epoch=True, type='LogProcessor', window_size=50)
metainfo = dict(
    classes=(
        'airplane',
        'bridge',
        'storage-tank',
        'ship',
        'swimming-pool',
        'vehicle',
        'person',
        'wind-mill',
    ))
model = dict(
    backbone=dict(
        depth=50,
        frozen_stages=1,
        init_cfg=dict(checkpoint='torchvision://resnet50', type='Pretrained'),
        norm_cfg=dict(requires_grad=True, type='BN'),
        norm_eval=True,
        num_stages=4,
        out_indices=(
            0,
            1,
            2,
            3,
        ),
        style='pytorch',
        type='ResNet'),
    data_preprocessor=dict(
        bgr_to_rgb=True,
        mean=[
            123.675,
            116.28,
            103.53,
        ],
        pad_size_divisor=32,
        std=[
            58.395,
            57.12,
            57.375,
        ],
        type='DetDataPreprocessor'),
    neck=dict(
        in_channels=[
            256,
            512,
            1024,
            2048,
        ],
        num_outs=5,
        out_channels=256,
        type='FPN'),
    roi_head=dict(
        bbox_head=dict(
            bbox_coder=dict(
                target_means=[
                    0.0,
                    0.0,
                    0.0,
                    0.0,
                ],
                target_stds=[
                    0.1,
                    0.1,
                    0.2,
                    0.2,
                ],
                type='DeltaXYWHBBoxCoder'),
            fc_out_channels=1024,
            in_channels=256,
            loss_bbox=dict(loss_weight=1.0, type='L1Loss'),
            loss_cls=dict(
                loss_weight=1.0, type='CrossEntropyLoss', use_sigmoid=False),
            num_classes=8,
            reg_class_agnostic=False,
            roi_feat_size=7,
            type='Shared2FCBBoxHead'),
        bbox_roi_extractor=dict(
            featmap_strides=[
                4,
                8,
                16,
                32,
            ],
            out_channels=256,
            roi_layer=dict(output_size=7, sampling_ratio=0, type='RoIAlign'),
            type='SingleRoIExtractor'),
        type='StandardRoIHead'),
    rpn_head=dict(
        anchor_generator=dict(
            ratios=[
                0.5,
                1.0,
                2.0,
            ],
            scales=[
                8,
            ],
            strides=[
                4,
                8,
                16,
                32,
                64,
            ],
            type='AnchorGenerator'),
        bbox_coder=dict(
            target_means=[
                0.0,
                0.0,
                0.0,
                0.0,
            ],
            target_stds=[
                1.0,
                1.0,
                1.0,
                1.0,
            ],
            type='DeltaXYWHBBoxCoder'),
        feat_channels=256,
        in_channels=256,
        loss_bbox=dict(loss_weight=1.0, type='L1Loss'),
        loss_cls=dict(
            loss_weight=1.0, type='CrossEntropyLoss', use_sigmoid=True),
        type='RPNHead'),
    test_cfg=dict(
        rcnn=dict(
            max_per_img=3000,
            nms=dict(iou_threshold=0.5, type='nms'),
            score_thr=0.05),
        rpn=dict(
            max_per_img=3000,
            min_bbox_size=0,
            nms=dict(iou_threshold=0.7, type='nms'),
            nms_pre=3000)),
    train_cfg=dict(
        rcnn=dict(
            assigner=dict(
                gpu_assign_thr=512,
                ignore_iof_thr=-1,
                match_low_quality=False,
                min_pos_iou=0.5,
                neg_iou_thr=0.5,
                pos_iou_thr=0.5,
                type='MaxIoUAssigner'),
            debug=False,
            pos_weight=-1,
            sampler=dict(
                add_gt_as_proposals=True,
                neg_pos_ub=-1,
                num=512,
                pos_fraction=0.25,
                type='RandomSampler')),
        rpn=dict(
            allowed_border=-1,
            assigner=dict(
                gpu_assign_thr=512,
                ignore_iof_thr=-1,
                match_low_quality=True,
                min_pos_iou=0.3,
                neg_iou_thr=0.3,
                pos_iou_thr=0.7,
                type='MaxIoUAssigner'),
            debug=False,
            pos_weight=-1,
            sampler=dict(
                add_gt_as_proposals=False,
                neg_pos_ub=-1,
                num=256,
                pos_fraction=0.5,
                type='RandomSampler')),
        rpn_proposal=dict(
            max_per_img=3000,
            min_bbox_size=0,
            nms=dict(iou_threshold=0.7, type='nms'),
            nms_pre=3000)),
    type='FasterRCNN')
optim_wrapper = dict(
    optimizer=dict(lr=0.02, momentum=0.9, type='SGD', weight_decay=0.0001),
    paramwise_cfg=dict(
        custom_keys=dict({'backbone.layer1': dict(lr_mult=0.1)})),
    type='OptimWrapper')
param_scheduler = [
    dict(
        begin=0, by_epoch=False, end=500, start_factor=0.001,
        type='LinearLR'),
    dict(
        begin=0,
        by_epoch=True,
        end=12,
        gamma=0.1,
        milestones=[
            8,
            11,
        ],
        type='MultiStepLR'),
]
resume = False
test_cfg = dict(type='TestLoop')
test_dataloader = dict(
    batch_size=1,
    dataset=dict(
        ann_file='annotations/aitod_test_v1.json',
        backend_args=None,
        data_prefix=dict(img='test/images/'),
        data_root='data/AI-TOD/',
        metainfo=dict(
            classes=(
                'airplane',
                'bridge',
                'storage-tank',
                'ship',
                'swimming-pool',
                'vehicle',
                'person',
                'wind-mill',
            )),
        pipeline=[
            dict(backend_args=None, type='LoadImageFromFile'),
            dict(keep_ratio=True, scale=(
                1333,
                800,
            ), type='Resize'),
            dict(type='LoadAnnotations', with_bbox=True),
            dict(
                meta_keys=(
                    'img_id',
                    'img_path',
                    'ori_shape',
                    'img_shape',
                    'scale_factor',
                ),
                type='PackDetInputs'),
        ],
        test_mode=True,
        type='CocoDataset'),
    drop_last=False,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(shuffle=False, type='DefaultSampler'))
test_evaluator = dict(
    ann_file='data/AI-TOD/annotations/aitod_test_v1.json',
    backend_args=None,
    format_only=False,
    metric='bbox',
    type='CocoMetric')
test_pipeline = [
    dict(backend_args=None, type='LoadImageFromFile'),
    dict(keep_ratio=True, scale=(
        1333,
        800,
    ), type='Resize'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        meta_keys=(
            'img_id',
            'img_path',
            'ori_shape',
            'img_shape',
            'scale_factor',
        ),
        type='PackDetInputs'),
]
train_cfg = dict(max_epochs=12, type='EpochBasedTrainLoop', val_interval=1)
val_cfg = dict(type='ValLoop')
vis_backends = [
    dict(type='LocalVisBackend'),
]
visualizer = dict(
    name='visualizer',
    type='DetLocalVisualizer',
    vis_backends=[
        dict(type='LocalVisBackend'),
    ])
work_dir = './work_dirs/faster-rcnn_r50_fpn_1x_aitod'
"""

# mmdet 2 retinanet_r50_fpn_1x_coco.py (one stage, octave anchors), merged; data.test only.
MMDET2_RETINANET = """\
model = dict(
    type='RetinaNet',
    backbone=dict(
        type='ResNet',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        style='pytorch',
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')),
    neck=dict(
        type='FPN',
        in_channels=[256, 512, 1024, 2048],
        out_channels=256,
        start_level=1,
        add_extra_convs='on_input',
        num_outs=5),
    bbox_head=dict(
        type='RetinaHead',
        num_classes=80,
        in_channels=256,
        stacked_convs=4,
        feat_channels=256,
        anchor_generator=dict(
            type='AnchorGenerator',
            octave_base_scale=4,
            scales_per_octave=3,
            ratios=[0.5, 1.0, 2.0],
            strides=[8, 16, 32, 64, 128]),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder',
            target_means=[0.0, 0.0, 0.0, 0.0],
            target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(
            type='FocalLoss',
            use_sigmoid=True,
            gamma=2.0,
            alpha=0.25,
            loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
    train_cfg=dict(
        assigner=dict(
            type='MaxIoUAssigner',
            pos_iou_thr=0.5,
            neg_iou_thr=0.4,
            min_pos_iou=0,
            ignore_iof_thr=-1),
        allowed_border=-1,
        pos_weight=-1,
        debug=False),
    test_cfg=dict(
        nms_pre=1000,
        min_bbox_size=0,
        score_thr=0.05,
        nms=dict(type='nms', iou_threshold=0.5),
        max_per_img=100))
dataset_type = 'CocoDataset'
data_root = 'data/coco/'
img_norm_cfg = dict(
    mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
data = dict(
    samples_per_gpu=2,
    workers_per_gpu=2,
    test=dict(
        type='CocoDataset',
        ann_file='data/coco/annotations/instances_val2017.json',
        img_prefix='data/coco/val2017/',
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(
                type='MultiScaleFlipAug',
                img_scale=(1333, 800),
                flip=False,
                transforms=[
                    dict(type='Resize', keep_ratio=True),
                    dict(type='RandomFlip'),
                    dict(
                        type='Normalize',
                        mean=[123.675, 116.28, 103.53],
                        std=[58.395, 57.12, 57.375],
                        to_rgb=True),
                    dict(type='Pad', size_divisor=32),
                    dict(type='ImageToTensor', keys=['img']),
                    dict(type='Collect', keys=['img'])
                ])
        ]))
evaluation = dict(interval=1, metric='bbox')
optimizer = dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0001)
optimizer_config = dict(grad_clip=None)
runner = dict(type='EpochBasedRunner', max_epochs=12)
work_dir = './work_dirs/retinanet_r50_fpn_1x_coco'
gpu_ids = [0]
"""

# TinyPerson configs/bottom-heavy/bh_sspnet.py, merged: test_cfg beside the model (as that file
# writes it), soft-NMS, 500 detections, a two-scale test, Albu's keymap, a one-class dataset.
TINYPERSON_BH_SSPNET = """\
custom_imports = dict(
    imports=['mmdet.models.backbones.bh_resnet'], allow_failed_imports=False)
model = dict(
    type='FasterSSPNet',
    backbone=dict(
        type='BHResNet',
        depth=50,
        strides=(2, 2, 2, 2),
        init_cfg=dict(
            type='Pretrained',
            checkpoint='./ckpt/bh50_in1k.pth',
            prefix='backbone')),
    neck=dict(
        type='SSFPN',
        in_channels=[256, 512, 1024, 2048],
        out_channels=256,
        num_outs=5),
    rpn_head=dict(
        type='RPNHead',
        in_channels=256,
        feat_channels=256,
        anchor_generator=dict(
            type='AnchorGenerator',
            scales=[1.5, 2.5, 3.7, 8],
            ratios=[0.4, 0.8, 1.4],
            strides=[4, 8, 16, 32, 64]),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder',
            target_means=[0.0, 0.0, 0.0, 0.0],
            target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(
            type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
    roi_head=dict(
        type='StandardRoIHead',
        bbox_roi_extractor=dict(
            type='SingleRoIExtractor',
            roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0),
            out_channels=256,
            featmap_strides=[4, 8, 16, 32]),
        bbox_head=dict(
            type='Shared2FCBBoxHead',
            in_channels=256,
            fc_out_channels=1024,
            roi_feat_size=7,
            num_classes=1,
            bbox_coder=dict(
                type='DeltaXYWHBBoxCoder',
                target_means=[0.0, 0.0, 0.0, 0.0],
                target_stds=[0.1, 0.1, 0.2, 0.2]),
            reg_class_agnostic=False,
            loss_cls=dict(
                type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type='L1Loss', loss_weight=1.0))))
train_cfg = dict(
    rpn=dict(
        assigner=dict(
            type='MaxIoUAssigner',
            pos_iou_thr=0.7,
            neg_iou_thr=0.3,
            min_pos_iou=0.3,
            match_low_quality=True,
            ignore_iof_thr=-1),
        sampler=dict(
            type='ICNegSampler',
            num=256,
            pos_fraction=0.5,
            neg_pos_ub=-1,
            add_gt_as_proposals=False),
        allowed_border=-1,
        pos_weight=-1,
        debug=False),
    rpn_proposal=dict(
        nms_pre=2000,
        max_per_img=1000,
        nms=dict(type='nms', iou_threshold=0.7),
        min_bbox_size=0),
    rcnn=dict(
        assigner=dict(
            type='MaxIoUAssigner',
            pos_iou_thr=0.5,
            neg_iou_thr=0.5,
            min_pos_iou=0.5,
            match_low_quality=False,
            ignore_iof_thr=-1),
        sampler=dict(
            type='RandomSampler',
            num=512,
            pos_fraction=0.25,
            neg_pos_ub=-1,
            add_gt_as_proposals=True),
        pos_weight=-1,
        debug=False))
test_cfg = dict(
    rpn=dict(
        nms_across_levels=False,
        nms_pre=1000,
        max_per_img=1000,
        nms=dict(type='nms', iou_threshold=0.7),
        min_bbox_size=0),
    rcnn=dict(
        score_thr=0.05,
        nms=dict(type='soft_nms', iou_threshold=0.3, min_score=0.05),
        max_per_img=500))
dataset_type = 'CocoDataset'
data_root = './data/tiny_set/'
classes = ('person', )
img_norm_cfg = dict(
    mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
data = dict(
    samples_per_gpu=1,
    workers_per_gpu=1,
    train=dict(
        type='CocoDataset',
        ann_file='./data/tiny_set/ssp_anno/train/train_overlap30.json',
        img_prefix='./data/tiny_set/train',
        classes=('person', ),
        pipeline=[
            dict(type='LoadSubImageFromFile'),
            dict(type='LoadAnnotations', with_bbox=True),
            dict(
                type='Resize',
                img_scale=[(640, 512), (960, 768)],
                keep_ratio=True),
            dict(
                type='Albu',
                transforms=[
                    dict(
                        type='ShiftScaleRotate',
                        shift_limit=0.0625,
                        scale_limit=0.0,
                        rotate_limit=45,
                        interpolation=1,
                        p=0.5),
                    dict(type='ChannelShuffle', p=0.1)
                ],
                bbox_params=dict(
                    type='BboxParams',
                    format='pascal_voc',
                    label_fields=['gt_labels'],
                    min_visibility=0.0,
                    filter_lost_elements=True),
                keymap=dict(img='image', gt_bboxes='bboxes'),
                update_pad_shape=False,
                skip_img_without_anno=True),
            dict(type='RandomFlip', flip_ratio=0.5),
            dict(
                type='Normalize',
                mean=[123.675, 116.28, 103.53],
                std=[58.395, 57.12, 57.375],
                to_rgb=True),
            dict(type='Pad', size_divisor=32),
            dict(type='DefaultFormatBundle'),
            dict(
                type='Collect',
                keys=['img', 'gt_bboxes', 'gt_labels', 'gt_bboxes_ignore'])
        ]),
    test=dict(
        type='CocoDataset',
        ann_file='./data/tiny_set/ssp_anno/test/tiny_set_test_single.json',
        img_prefix='./data/tiny_set/test',
        classes=('person', ),
        pipeline=[
            dict(type='LoadSubImageFromFile'),
            dict(
                type='MultiScaleFlipAug',
                img_scale=[(1280, 1024), (1920, 1536)],
                flip=False,
                transforms=[
                    dict(type='Resize', keep_ratio=True),
                    dict(type='RandomFlip'),
                    dict(
                        type='Normalize',
                        mean=[123.675, 116.28, 103.53],
                        std=[58.395, 57.12, 57.375],
                        to_rgb=True),
                    dict(type='Pad', size_divisor=32),
                    dict(type='ImageToTensor', keys=['img']),
                    dict(type='Collect', keys=['img'])
                ])
        ]))
evaluation = dict(
    interval=4, metric='bbox', proposal_nums=[1000], iou_thrs=[0.5])
optimizer = dict(type='SGD', lr=0.002, momentum=0.9, weight_decay=0.0001)
total_epochs = 12
"""

# mmdet 2.0 cascade_rcnn_r50_fpn_1x_coco.py, merged: test_cfg beside the model, with the keys
# of that time (rpn max_num / nms_thr, nms iou_thr) and one bbox head per cascade stage.
MMDET20_CASCADE_RCNN = """\
model = dict(
    type='CascadeRCNN',
    pretrained='torchvision://resnet50',
    backbone=dict(
        type='ResNet',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        style='pytorch'),
    neck=dict(
        type='FPN',
        in_channels=[256, 512, 1024, 2048],
        out_channels=256,
        num_outs=5),
    rpn_head=dict(
        type='RPNHead',
        in_channels=256,
        feat_channels=256,
        anchor_generator=dict(
            type='AnchorGenerator',
            scales=[8],
            ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32, 64]),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder',
            target_means=[0.0, 0.0, 0.0, 0.0],
            target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(
            type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0),
        loss_bbox=dict(
            type='SmoothL1Loss', beta=0.1111111111111111, loss_weight=1.0)),
    roi_head=dict(
        type='CascadeRoIHead',
        num_stages=3,
        stage_loss_weights=[1, 0.5, 0.25],
        bbox_roi_extractor=dict(
            type='SingleRoIExtractor',
            roi_layer=dict(type='RoIAlign', out_size=7, sample_num=0),
            out_channels=256,
            featmap_strides=[4, 8, 16, 32]),
        bbox_head=[
            dict(
                type='Shared2FCBBoxHead',
                in_channels=256,
                fc_out_channels=1024,
                roi_feat_size=7,
                num_classes=80,
                bbox_coder=dict(
                    type='DeltaXYWHBBoxCoder',
                    target_means=[0.0, 0.0, 0.0, 0.0],
                    target_stds=[0.1, 0.1, 0.2, 0.2]),
                reg_class_agnostic=True,
                loss_cls=dict(
                    type='CrossEntropyLoss',
                    use_sigmoid=False,
                    loss_weight=1.0),
                loss_bbox=dict(type='SmoothL1Loss', beta=1.0,
                               loss_weight=1.0)),
            dict(
                type='Shared2FCBBoxHead',
                in_channels=256,
                fc_out_channels=1024,
                roi_feat_size=7,
                num_classes=80,
                bbox_coder=dict(
                    type='DeltaXYWHBBoxCoder',
                    target_means=[0.0, 0.0, 0.0, 0.0],
                    target_stds=[0.05, 0.05, 0.1, 0.1]),
                reg_class_agnostic=True,
                loss_cls=dict(
                    type='CrossEntropyLoss',
                    use_sigmoid=False,
                    loss_weight=1.0),
                loss_bbox=dict(type='SmoothL1Loss', beta=1.0,
                               loss_weight=1.0)),
            dict(
                type='Shared2FCBBoxHead',
                in_channels=256,
                fc_out_channels=1024,
                roi_feat_size=7,
                num_classes=80,
                bbox_coder=dict(
                    type='DeltaXYWHBBoxCoder',
                    target_means=[0.0, 0.0, 0.0, 0.0],
                    target_stds=[0.033, 0.033, 0.067, 0.067]),
                reg_class_agnostic=True,
                loss_cls=dict(
                    type='CrossEntropyLoss',
                    use_sigmoid=False,
                    loss_weight=1.0),
                loss_bbox=dict(type='SmoothL1Loss', beta=1.0, loss_weight=1.0))
        ]))
train_cfg = dict(
    rpn=dict(
        assigner=dict(
            type='MaxIoUAssigner',
            pos_iou_thr=0.7,
            neg_iou_thr=0.3,
            min_pos_iou=0.3,
            ignore_iof_thr=-1),
        sampler=dict(
            type='RandomSampler',
            num=256,
            pos_fraction=0.5,
            neg_pos_ub=-1,
            add_gt_as_proposals=False),
        allowed_border=0,
        pos_weight=-1,
        debug=False),
    rpn_proposal=dict(
        nms_across_levels=False,
        nms_pre=2000,
        nms_post=2000,
        max_num=2000,
        nms_thr=0.7,
        min_bbox_size=0))
test_cfg = dict(
    rpn=dict(
        nms_across_levels=False,
        nms_pre=1000,
        nms_post=1000,
        max_num=1000,
        nms_thr=0.7,
        min_bbox_size=0),
    rcnn=dict(
        score_thr=0.05, nms=dict(type='nms', iou_thr=0.5), max_per_img=100))
dataset_type = 'CocoDataset'
data_root = 'data/coco/'
data = dict(
    samples_per_gpu=2,
    workers_per_gpu=2,
    test=dict(
        type='CocoDataset',
        ann_file='data/coco/annotations/instances_val2017.json',
        img_prefix='data/coco/val2017/',
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(
                type='MultiScaleFlipAug',
                img_scale=(1333, 800),
                flip=False,
                transforms=[
                    dict(type='Resize', keep_ratio=True),
                    dict(type='RandomFlip'),
                    dict(
                        type='Normalize',
                        mean=[123.675, 116.28, 103.53],
                        std=[58.395, 57.12, 57.375],
                        to_rgb=True),
                    dict(type='Pad', size_divisor=32),
                    dict(type='ImageToTensor', keys=['img']),
                    dict(type='Collect', keys=['img'])
                ])
        ]))
total_epochs = 12
work_dir = './work_dirs/cascade_rcnn_r50_fpn_1x_coco'
gpu_ids = range(0, 1)
"""

# CFINet configs/cfinet/faster_rcnn_r50_fpn_cfinet_1x.py (mmdet 2.26) merged with its bases:
# CRPNHead's anchors live in its first stage; the test_cfg overrides merged into the base ones.
CFINET_SODAD = """\
model = dict(
    type='FasterRCNN',
    backbone=dict(
        type='ResNet',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        style='pytorch',
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')),
    neck=dict(
        type='FPN',
        in_channels=[256, 512, 1024, 2048],
        out_channels=256,
        num_outs=4),
    rpn_head=dict(
        type='CRPNHead',
        num_stages=2,
        stages=[
            dict(
                type='StageRefineRPNHead',
                in_channels=256,
                feat_channels=256,
                anchor_generator=dict(
                    type='AnchorGenerator',
                    scales=[2],
                    ratios=[1.0],
                    strides=[4, 8, 16, 32]),
                refine_reg_factor=200.0,
                refine_cfg=dict(type='dilation', dilation=3),
                refined_feature=True,
                sampling=False,
                with_cls=False,
                reg_decoded_bbox=True,
                bbox_coder=dict(
                    type='DeltaXYWHBBoxCoder',
                    target_means=(0.0, 0.0, 0.0, 0.0),
                    target_stds=(0.1, 0.1, 0.5, 0.5)),
                loss_bbox=dict(type='IoULoss', linear=True, loss_weight=9.0)),
            dict(
                type='StageRefineRPNHead',
                in_channels=256,
                feat_channels=256,
                refine_cfg=dict(type='offset'),
                refined_feature=True,
                sampling=True,
                with_cls=True,
                reg_decoded_bbox=True,
                bbox_coder=dict(
                    type='DeltaXYWHBBoxCoder',
                    target_means=(0.0, 0.0, 0.0, 0.0),
                    target_stds=(0.05, 0.05, 0.1, 0.1)),
                loss_cls=dict(
                    type='CrossEntropyLoss', use_sigmoid=True,
                    loss_weight=0.9),
                loss_bbox=dict(type='IoULoss', linear=True, loss_weight=9.0))
        ]),
    roi_head=dict(
        type='FIRoIHead',
        bbox_roi_extractor=dict(
            type='SingleRoIExtractor',
            roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0),
            out_channels=256,
            featmap_strides=[4, 8, 16, 32]),
        bbox_head=dict(
            type='Shared2FCBBoxHead',
            in_channels=256,
            fc_out_channels=1024,
            roi_feat_size=7,
            num_classes=9,
            bbox_coder=dict(
                type='DeltaXYWHBBoxCoder',
                target_means=[0.0, 0.0, 0.0, 0.0],
                target_stds=[0.1, 0.1, 0.2, 0.2]),
            reg_class_agnostic=False,
            loss_cls=dict(
                type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
        num_gpus=1,
        temperature=0.6,
        contrast_loss_weights=0.5,
        num_con_queue=256,
        con_sampler_cfg=dict(num=128, pos_fraction=[0.5, 0.25, 0.125]),
        con_queue_dir='./work_dirs/roi_feats/cfinet',
        ins_quality_assess_cfg=dict(
            cls_score=0.05,
            hq_score=0.65,
            lq_score=0.25,
            hq_pro_counts_thr=8)),
    train_cfg=dict(
        rpn=[
            dict(
                assigner=dict(
                    type='DynamicAssigner',
                    low_quality_iou_thr=0.2,
                    base_pos_iou_thr=0.25,
                    neg_iou_thr=0.15),
                allowed_border=-1,
                pos_weight=-1,
                debug=False),
            dict(
                assigner=dict(
                    type='MaxIoUAssigner',
                    pos_iou_thr=0.7,
                    neg_iou_thr=0.7,
                    min_pos_iou=0.3,
                    ignore_iof_thr=-1),
                sampler=dict(
                    type='RandomSampler',
                    num=256,
                    pos_fraction=0.5,
                    neg_pos_ub=-1,
                    add_gt_as_proposals=False),
                allowed_border=-1,
                pos_weight=-1,
                debug=False)
        ],
        rpn_proposal=dict(
            nms_pre=2000,
            max_per_img=300,
            nms=dict(type='nms', iou_threshold=0.8),
            min_bbox_size=0),
        rcnn=dict(
            assigner=dict(
                type='MaxIoUAssigner',
                pos_iou_thr=0.5,
                neg_iou_thr=0.5,
                min_pos_iou=0.5,
                match_low_quality=False,
                ignore_iof_thr=-1),
            sampler=dict(
                type='RandomSampler',
                num=256,
                pos_fraction=0.5,
                neg_pos_ub=-1,
                add_gt_as_proposals=True),
            pos_weight=-1,
            debug=False)),
    test_cfg=dict(
        rpn=dict(
            nms_pre=1000,
            max_per_img=300,
            nms=dict(type='nms', iou_threshold=0.5),
            min_bbox_size=0),
        rcnn=dict(
            score_thr=0.05,
            nms=dict(type='nms', iou_threshold=0.5),
            max_per_img=100)))
dataset_type = 'SODADDataset'
data_root = '/data/SODA-D/'
img_norm_cfg = dict(
    mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='MultiScaleFlipAug',
        img_scale=(1200, 1200),
        flip=False,
        transforms=[
            dict(type='Resize', keep_ratio=True),
            dict(type='RandomFlip'),
            dict(
                type='Normalize',
                mean=[123.675, 116.28, 103.53],
                std=[58.395, 57.12, 57.375],
                to_rgb=True),
            dict(type='Pad', size_divisor=32),
            dict(type='DefaultFormatBundle'),
            dict(type='Collect', keys=['img'])
        ])
]
data = dict(
    samples_per_gpu=4,
    workers_per_gpu=2,
    test=dict(
        type='SODADDataset',
        ann_file='/data/SODA-D/divData/Annotations/test.json',
        img_prefix='/data/SODA-D/divData/Images/',
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(
                type='MultiScaleFlipAug',
                img_scale=(1200, 1200),
                flip=False,
                transforms=[
                    dict(type='Resize', keep_ratio=True),
                    dict(type='RandomFlip'),
                    dict(
                        type='Normalize',
                        mean=[123.675, 116.28, 103.53],
                        std=[58.395, 57.12, 57.375],
                        to_rgb=True),
                    dict(type='Pad', size_divisor=32),
                    dict(type='DefaultFormatBundle'),
                    dict(type='Collect', keys=['img'])
                ])
        ],
        ori_ann_file='/data/SODA-D/rawData/Annotations/test_wo_ignore.json'))
evaluation = dict(interval=12, metric='bbox')
optimizer = dict(
    type='SGD',
    lr=0.01,
    momentum=0.9,
    weight_decay=0.0001,
    paramwise_cfg=dict(
        custom_keys={
            'roi_head.fc_enc': dict(lr_mult=0.05),
            'roi_head.fc_proj': dict(lr_mult=0.05)
        }))
optimizer_config = dict(grad_clip=None)
lr_config = dict(
    policy='step',
    warmup='linear',
    warmup_iters=500,
    warmup_ratio=0.001,
    step=[8, 11])
runner = dict(type='EpochBasedRunner', max_epochs=12)
find_unused_parameters = True
rpn_weight = 0.9
fp16 = dict(loss_scale='dynamic')
total_epochs = 12
work_dir = './work_dirs/faster_rcnn_r50_fpn_cfinet_1x'
gpu_ids = [0]
"""


def _settings(text: str) -> dict[str, Any]:
    parsed = parse_config_text(text)
    assert parsed.skipped == ()
    return test_settings(parsed)


def test_mmdet2_faster_rcnn() -> None:
    parsed = parse_config_text(MMDET2_FASTER_RCNN)
    assert parsed.skipped == () and parsed.skipped_names == []
    assert parsed["lr_config"]["step"] == [8, 11] and parsed["workflow"] == [("train", 1)]
    assert parsed["resume_from"] is None and parsed["train_pipeline"][2]["img_scale"] == (1333, 800)
    assert test_settings(parsed) == {
        "score_threshold": 0.05,
        "nms_type": "nms",
        "nms_iou": 0.5,
        "max_per_img": 100,
        "rpn_max_per_img": 1000,
        "rpn_nms_pre": 1000,
        "rpn_iou": 0.7,
        "test_size": (800, 1333),
        "keep_ratio": True,
        "anchor_scales": [8],
        "anchor_ratios": [0.5, 1.0, 2.0],
        "anchor_strides": [4, 8, 16, 32, 64],
        "num_classes": 80,
    }


AITOD_CLASSES = ["airplane", "bridge", "storage-tank", "ship", "swimming-pool", "vehicle", "person", "wind-mill"]


def test_mmdet3_mmengine_faster_rcnn() -> None:
    parsed = parse_config_text(MMDET3_FASTER_RCNN)
    assert parsed.skipped == ()
    # mmengine writes a dict with dotted keys as dict({...}); the runner's loops are also called test_cfg
    assert parsed["optim_wrapper"]["paramwise_cfg"]["custom_keys"] == {"backbone.layer1": {"lr_mult": 0.1}}
    assert parsed["test_cfg"] == {"type": "TestLoop"}
    assert test_settings(parsed) == {
        "score_threshold": 0.05,
        "nms_type": "nms",
        "nms_iou": 0.5,
        "max_per_img": 3000,
        "rpn_max_per_img": 3000,
        "rpn_nms_pre": 3000,
        "rpn_iou": 0.7,
        "test_size": (800, 1333),
        "keep_ratio": True,
        "anchor_scales": [8],
        "anchor_ratios": [0.5, 1.0, 2.0],
        "anchor_strides": [4, 8, 16, 32, 64],
        "num_classes": 8,
        "classes": AITOD_CLASSES,
    }


def test_retinanet_octave_anchors() -> None:
    settings = _settings(MMDET2_RETINANET)
    # mmdet's AnchorGenerator: octave_base_scale * 2**(i / scales_per_octave), i < scales_per_octave
    assert settings.pop("anchor_scales") == pytest.approx([4.0, 5.039684199579493, 6.3496042078727974], rel=1e-12)
    assert settings == {
        "score_threshold": 0.05,
        "nms_type": "nms",
        "nms_iou": 0.5,
        "max_per_img": 100,
        "nms_pre": 1000,
        "test_size": (800, 1333),
        "keep_ratio": True,
        "anchor_ratios": [0.5, 1.0, 2.0],
        "anchor_strides": [8, 16, 32, 64, 128],
        "num_classes": 80,
    }


def test_tinyperson_soft_nms_and_multi_scale_test() -> None:
    assert _settings(TINYPERSON_BH_SSPNET) == {
        "score_threshold": 0.05,
        "nms_type": "soft_nms",
        "nms_iou": 0.3,
        "min_score": 0.05,
        "max_per_img": 500,
        "rpn_max_per_img": 1000,
        "rpn_nms_pre": 1000,
        "rpn_iou": 0.7,
        # two test scales: reported as such, never folded into one export size
        "test_sizes": [(1024, 1280), (1536, 1920)],
        "keep_ratio": True,
        "anchor_scales": [1.5, 2.5, 3.7, 8],
        "anchor_ratios": [0.4, 0.8, 1.4],
        "anchor_strides": [4, 8, 16, 32, 64],
        "num_classes": 1,
        "classes": ["person"],
    }


def test_mmdet20_old_keys_and_cascade_heads() -> None:
    parsed = parse_config_text(MMDET20_CASCADE_RCNN)
    # `gpu_ids = range(0, 1)` is how mmcv prints a range: a call, skipped and named, the rest read
    assert parsed.skipped_names == ["gpu_ids"] and "range" in parsed.skipped[0].reason
    assert test_settings(parsed) == {
        "score_threshold": 0.05,
        "nms_type": "nms",
        "nms_iou": 0.5,
        "max_per_img": 100,
        "rpn_max_per_img": 1000,
        "rpn_nms_pre": 1000,
        "rpn_iou": 0.7,
        "test_size": (800, 1333),
        "keep_ratio": True,
        "anchor_scales": [8],
        "anchor_ratios": [0.5, 1.0, 2.0],
        "anchor_strides": [4, 8, 16, 32, 64],
        "num_classes": 80,
    }


def test_cfinet_merged_config() -> None:
    parsed = parse_config_text(CFINET_SODAD)
    assert parsed.skipped == ()
    assert parsed["optimizer"]["paramwise_cfg"]["custom_keys"]["roi_head.fc_proj"] == {"lr_mult": 0.05}
    assert test_settings(parsed) == {
        "score_threshold": 0.05,
        "nms_type": "nms",
        "nms_iou": 0.5,
        "max_per_img": 100,
        "rpn_max_per_img": 300,
        "rpn_nms_pre": 1000,
        "rpn_iou": 0.5,
        "test_size": (1200, 1200),
        "keep_ratio": True,
        "anchor_scales": [2],
        "anchor_ratios": [1.0],
        "anchor_strides": [4, 8, 16, 32],
        "num_classes": 9,
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the test dataset's pipeline is what ran, even where the test_pipeline variable says otherwise
        (
            "test_pipeline = [dict(type='Resize', scale=(1333, 800), keep_ratio=True)]\n"
            "test_dataloader = dict(dataset=dict(pipeline=[dict(type='mmdet.Resize', scale=(1024, 768))]))\n",
            {"test_size": (768, 1024)},
        ),
        # an int scale is square (mmcv 2 Resize); keep_ratio only when the config writes it
        (
            "test_pipeline = [dict(type='Resize', scale=640, keep_ratio=False)]\n",
            {"test_size": (640, 640), "keep_ratio": False},
        ),
        # mmdet 2 pipelines may resize directly, without MultiScaleFlipAug
        (
            "data = dict(test=dict(pipeline=[dict(type='Resize', img_scale=[1333, 800], keep_ratio=True)]))\n",
            {"test_size": (800, 1333), "keep_ratio": True},
        ),
        # YOLOX-style configs: only the img_scale variable, the pipeline scales by factor
        (
            "img_scale = (640, 640)\n"
            "test_pipeline = [dict(type='MultiScaleFlipAug', scale_factor=1.0, transforms=[])]\n",
            {"test_size": (640, 640)},
        ),
    ],
)
def test_test_size_sources(text: str, expected: dict[str, Any]) -> None:
    assert _settings(text) == expected


def test_settings_refuse_values_of_the_wrong_type() -> None:
    text = (
        "model = dict(\n"
        "    bbox_head=dict(num_classes='80', anchor_generator=dict(scales=[8, 'x'], ratios=[1.0], strides=None)),\n"
        "    test_cfg=dict(\n"
        "        rpn=dict(nms_pre=1000, max_per_img=1000, nms=None),\n"
        "        rcnn=dict(score_thr='0.05', nms=dict(type=None, iou_threshold=True), max_per_img=100.0)))\n"
        "data = dict(test=dict(classes='classes.txt', pipeline=[dict(type='Resize', scale=(0, 800))]))\n"
    )
    # only well-typed values come back: the caller falls back to its recipe for the rest
    assert _settings(text) == {"rpn_max_per_img": 1000, "rpn_nms_pre": 1000, "anchor_ratios": [1.0]}
    assert test_settings({}) == {} and test_settings({"model": "FasterRCNN", "test_cfg": [1]}) == {}


def test_plain_data_subset() -> None:
    parsed = parse_config_text(
        "base_lr = 0.02 / 8\n"
        "steps = [8, 11]\n"
        "optimizer = dict(type='SGD', lr=base_lr, momentum=0.9, weight_decay=1e-4)\n"
        "runner = dict(max_epochs=steps[-1] + 1)\n"
        "scheduler = dict(**dict(type='step', warmup_ratio=-0.5 * 2), step=steps)\n"
        "mixed = dict({'a.b': 1}, c=(1, -2.5, None, True, 'x'))\n"
        "merged = {**mixed, 'a.b': 2}\n"
        "twice = dict(**dict(lr=1), lr=2)\n"
        "repeated = 'ab' * 3\n"
        "huge = 99999999999 * 99999999999\n"
        "zero = 1 / 0\n"
        "_base_ = ['../_base_/models/faster_rcnn_r50_fpn.py', '../_base_/datasets/coco_detection.py']\n"
        "steps = [1]\n"
    )
    assert dict(parsed) == {
        "base_lr": 0.0025,
        "steps": [1],  # the later assignment wins, as when Python runs it
        "optimizer": {"type": "SGD", "lr": 0.0025, "momentum": 0.9, "weight_decay": 0.0001},
        "scheduler": {"type": "step", "warmup_ratio": -1.0, "step": [8, 11]},
        "mixed": {"a.b": 1, "c": (1, -2.5, None, True, "x")},
        "merged": {"a.b": 2, "c": (1, -2.5, None, True, "x")},
        "_base_": ["../_base_/models/faster_rcnn_r50_fpn.py", "../_base_/datasets/coco_detection.py"],
    }
    assert parsed.skipped_names == ["runner", "twice", "repeated", "huge", "zero"]
    reasons = {statement.names[0]: statement.reason for statement in parsed.skipped}
    assert "Subscript" in reasons["runner"] and "'lr' twice" in reasons["twice"]
    assert "not a number" in reasons["repeated"] and "out of range" in reasons["huge"]
    assert "division by zero" in reasons["zero"]


def test_untrusted_text_is_never_executed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "MARKER"
    monkeypatch.chdir(tmp_path)

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("config text reached eval/exec")

    real_compile = builtins.compile

    def compile_to_ast_only(source: Any, filename: Any, mode: str, flags: int = 0, *args: Any, **kwargs: Any) -> Any:
        assert flags & ast.PyCF_ONLY_AST, "config text compiled to code, not to an AST"
        return real_compile(source, filename, mode, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)
    monkeypatch.setattr(builtins, "compile", compile_to_ast_only)
    touch = f"__import__('os').system('touch {marker}')"
    text = (
        "import os\n"
        "from subprocess import run as go\n"
        "score = 0.05\n"
        f"pwned = {touch}\n"
        f"{touch}\n"
        f"leak = open({str(marker)!r}, 'w')\n"
        "path = os.path.join('a', 'b')\n"
        f"hook = lambda: {touch}\n"
        "everything = dict(**__builtins__)\n"
        "escape = ().__class__.__bases__[0].__subclasses__()\n"
        "names = [c for c in ('a', 'b')]\n"
        "title = f'{score}'\n"
        f"nested = dict(a=1, b={touch})\n"
        "also = pwned\n"
        f"def handler():\n    {touch}\n"
        f"class Evil:\n    x = {touch}\n"
        f"if True:\n    shadow = {touch}\n"
        "model = dict(test_cfg=dict(score_thr=score, nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))\n"
        "data = dict(test=dict(pipeline=[dict(type='Resize', scale=(1333, 800), keep_ratio=True)]))\n"
    )
    parsed = parse_config_text(text)
    assert not marker.exists()
    assert parsed.skipped_names == (
        ["os", "go", "pwned", "leak", "path", "hook", "everything", "escape", "names", "title", "nested", "also"]
        + ["handler", "Evil", "shadow"]
    )
    bare = next(statement for statement in parsed.skipped if statement.line == 5)
    assert bare.names == () and "__import__" in bare.reason
    assert "`pwned` was skipped" in next(s.reason for s in parsed.skipped if s.names == ("also",))
    assert dict(parsed) == {
        "score": 0.05,
        "model": {"test_cfg": {"score_thr": 0.05, "nms": {"type": "nms", "iou_threshold": 0.5}, "max_per_img": 100}},
        "data": {"test": {"pipeline": [{"type": "Resize", "scale": (1333, 800), "keep_ratio": True}]}},
    }
    assert test_settings(parsed) == {
        "score_threshold": 0.05,
        "nms_type": "nms",
        "nms_iou": 0.5,
        "max_per_img": 100,
        "test_size": (800, 1333),
        "keep_ratio": True,
    }


def test_rebinding_dict_stops_reading_dict_calls(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    parsed = parse_config_text(
        f"dict = lambda **kw: __import__('os').system('touch {marker}')\n"
        "model = dict(test_cfg=dict(score_thr=0.05))\n"
        "size = (1333, 800)\n"
    )
    assert not marker.exists()
    assert parsed.skipped_names == ["dict", "model"] and dict(parsed) == {"size": (1333, 800)}
    assert "rebound" in parsed.skipped[1].reason


def test_absurd_nesting_is_refused_not_crashed() -> None:
    parsed = parse_config_text("x = " + "-" * 900 + "1\ny = 2\n")
    assert dict(parsed) == {"y": 2} and parsed.skipped[0].reason == "nested too deeply to read"
    with pytest.raises(ConfigTextError, match="nested too deeply"):
        parse_config_text("x = " + "-" * 100_000 + "1\n")


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("a = 1\nmodel = dict(\n    test_cfg=dict(score_thr=0.05,, nms=None))\n", 3, "invalid syntax"),
        ("model = dict(\n    type='FasterRCNN',\n", 1, "never closed"),
        ("a = 1\nb = 'x\0y'\n", 2, "NUL byte"),
    ],
)
def test_malformed_text_is_a_clear_error_with_the_line(text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigTextError, match=message) as caught:
        parse_config_text(text)
    assert caught.value.lineno == line and f"at line {line}" in str(caught.value)
    # one error type for the CLI's `error:` line (UserError) that plain callers can catch as ValueError
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)
    assert caught.value.fix


def test_text_that_is_not_text() -> None:
    with pytest.raises(ConfigTextError, match="expected text, got bytes"):
        parse_config_text(b"model = dict()")  # type: ignore[arg-type]
