"""Both backbones are registered once in mmengine's root registry: every
OpenMMLab registry and a config with ``custom_imports`` find them."""
import pytest
from mmengine.config import Config
from mmengine.registry import MODELS

from mmvmamba.models import VMamba, VMamba2

SMALL = {
    VMamba: dict(embed_dims=16, depths=[1, 1, 2, 1]),
    VMamba2: dict(embed_dims=16, depths=[1, 1, 2, 1], ssm_ratio=1.0,
                  d_state=1, mlp_ratio=4.0),
}


@pytest.mark.parametrize('backbone', [VMamba, VMamba2])
@pytest.mark.parametrize('scope', ['mmpretrain', 'mmdet', 'mmseg'])
def test_builds_from_each_registry(scope, backbone):
    registry = pytest.importorskip(f'{scope}.registry').MODELS
    model = registry.build(dict(type=backbone.__name__, arch=SMALL[backbone]))
    assert isinstance(model, backbone)


@pytest.mark.parametrize('backbone,arch', [(VMamba, 'tiny'), (VMamba2, 't')])
def test_builds_from_config_with_custom_imports(backbone, arch):
    cfg = Config.fromstring(
        "custom_imports = dict(imports=['mmvmamba'], "
        "allow_failed_imports=False)\n"
        f"model = dict(type={backbone.__name__!r}, arch={arch!r}, "
        "out_indices=(0, 1))\n",
        file_format='.py')
    model = MODELS.build(cfg.model)
    assert isinstance(model, backbone) and model.out_indices == (0, 1)
