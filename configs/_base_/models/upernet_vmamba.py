# UperNet (+ FCN auxiliary head on stage 3) with a VMamba-T backbone.
# mmseg's stock model with the backbone swapped and ADE20K's 150 classes;
# SyncBN in the heads (tools/train.py makes it BN in a single process).
_base_ = 'mmseg::_base_/models/upernet_r50.py'
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)

model = dict(
    pretrained=None,
    data_preprocessor=dict(size=(512, 512)),  # pads test images to the crop
    backbone=dict(
        _delete_=True,
        type='VMamba',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.3,
        frozen_stages=-1,
        norm_eval=False,
        with_cp=False,
        # made by tools/model_converters/vmamba2mmvmamba.py (see README)
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/vmamba_t_in1k.pth',
            prefix='backbone.')),
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150))
