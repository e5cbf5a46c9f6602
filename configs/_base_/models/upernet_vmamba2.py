# UperNet (+ FCN auxiliary head on stage 2) with a VMamba2-T backbone (the
# authors' VMamba-T[s1l8]). mmseg's stock model with the backbone swapped
# and ADE20K's 150 classes, as in the authors' segmentation/configs/vssm1/
# upernet_vssm_4xb4-160k_ade20k-512x512_tiny.py; SyncBN in the heads
# (tools/train.py makes it BN in a single process).
_base_ = 'mmseg::_base_/models/upernet_r50.py'
custom_imports = dict(imports=['mmvmamba'], allow_failed_imports=False)

model = dict(
    pretrained=None,
    data_preprocessor=dict(size=(512, 512)),  # pads test images to the crop
    backbone=dict(
        _delete_=True,
        type='VMamba2',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        frozen_stages=-1,
        norm_eval=False,
        with_cp=False,
        # made by tools/model_converters/vmamba2mmvmamba.py (see README)
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/vmamba2_t_in1k.pth',
            prefix='backbone.')),
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150))
