"""Plot effective receptive fields (ERF) of backbones, initial and trained.

    python tools/analysis/erf.py CONFIG [CONFIG ...] [--checkpoint CKPT ...]
        --out erf.png [--images DIR] [--num-images 16] [--size 224]

Each CONFIG (a config file, ``pkg::config`` or a model name such as
``vmamba-t``, ``swin-t``, ``convnext-t``, ``resnet-50``, ``deit-s``: the
names of ``benchmarks/models.py``) gives its backbone's ERF as initialised
(the config's init, no pretrained weights); with ``--checkpoint`` (one per
CONFIG, ``-`` for none) also as loaded. All maps go side by side into one
PNG, one row per CONFIG.

The ERF of a backbone is how strongly each input pixel moves the central
pixel of its last feature map: the absolute gradient of that pixel's
rectified channels, summed, with respect to the image, summed over colour
channels and averaged over a batch of images (as RepLKNet and the VMamba
paper plot it). The ReLU matters: the channels of a LayerNorm output (the
last map of VMamba, Swin, ConvNeXt, ViT) sum to a constant, whose gradient
is zero.
Maps are shown on a log scale over :data:`DECADES` decades below their
maximum, so that weak but wide fields stay visible.

Images come from a folder (``--images``: resized and centre-cropped,
ImageNet-normalised), or, without it, are synthetic: sums of upsampled
Gaussian noise at octave scales, which have the falling spectrum of natural
images (no downloads are needed; the maps differ in detail from those of
real images).
"""
import argparse
import os
import os.path as osp
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, osp.join(REPO, 'benchmarks'))  # models.py: named models
from models import (last_stage_backbone, load_backbone_weights,  # noqa: E402
                    load_config)
from timing import check_cli_args  # noqa: E402

DECADES = 4
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


def synthetic_images(num: int, size: int, seed: int = 0) -> torch.Tensor:
    """Normalised ``(num, 3, size, size)`` images of multi-scale noise."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.zeros(num, 3, size, size)
    scale = 4
    while scale <= size:
        noise = torch.randn(num, 3, scale, scale, generator=gen)
        # amplitude ~ 1 / frequency: coarse octaves dominate
        images += F.interpolate(noise, size=(size, size), mode='bilinear',
                                align_corners=False) * (size / scale)**0.5
        scale *= 2
    images -= images.mean(dim=(1, 2, 3), keepdim=True)
    return images / images.std(dim=(1, 2, 3), keepdim=True)


def load_images(folder: str, num: int, size: int) -> torch.Tensor:
    """Up to ``num`` images of ``folder``, as normalised ``size`` crops."""
    import mmcv
    names = sorted(n for n in os.listdir(folder)
                   if n.lower().endswith(IMAGE_EXTENSIONS))[:num]
    if not names:
        raise FileNotFoundError(f'no images ({IMAGE_EXTENSIONS}) in {folder}')
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    batch = []
    for name in names:
        img = mmcv.imread(osp.join(folder, name))
        if img is None:
            raise ValueError(f'{osp.join(folder, name)} is not an image '
                             'that can be read')
        img = mmcv.bgr2rgb(img)
        img = mmcv.imrescale(img, size / min(img.shape[:2]))
        top = (img.shape[0] - size) // 2
        left = (img.shape[1] - size) // 2
        img = img[top:top + size, left:left + size]
        img = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
        batch.append((img.float() - mean) / std)
    return torch.stack(batch)


def effective_receptive_field(backbone: nn.Module,
                              images: torch.Tensor,
                              batch_size: int = 1) -> np.ndarray:
    """Mean absolute input gradient of the last map's central pixel
    (``relu(out[:, :, h // 2, w // 2]).sum()``).

    Args:
        backbone (nn.Module): Returns a tuple (or list) of ``(B, C, h, w)``
            maps; the last one is used. Run in eval mode.
        images (Tensor): ``(N, 3, H, W)`` on the backbone's device.
        batch_size (int): Images per backward pass.

    Returns:
        np.ndarray: ``(H, W)`` float64 map, averaged over the images.
    """
    backbone.eval()
    total = torch.zeros(images.shape[2:], dtype=torch.float64)
    for batch in images.split(batch_size):
        x = batch.clone().requires_grad_(True)
        out = backbone(x)
        out = out[-1] if isinstance(out, (tuple, list)) else out
        if out.dim() != 4:
            raise ValueError(f'the backbone\'s last output must be a '
                             f'(B, C, h, w) map, got {tuple(out.shape)}')
        h, w = out.shape[2:]
        centre = F.relu(out[:, :, h // 2, w // 2]).sum()
        grad, = torch.autograd.grad(centre, x)
        total += grad.abs().sum(dim=(0, 1)).double().cpu()
    return (total / images.shape[0]).numpy()


def log_scale(erf: np.ndarray, decades: int = DECADES) -> np.ndarray:
    """Map to [0, 1]: 1 at the maximum, 0 at ``decades`` below or less."""
    peak = erf.max()
    if peak <= 0:
        return np.zeros_like(erf)
    logs = np.log10(np.maximum(erf / peak, 10.**-decades))
    return logs / decades + 1


def high_contribution_ratio(erf: np.ndarray,
                            fractions: Sequence[float] = (0.2, 0.3, 0.5)
                            ) -> List[float]:
    """Side of the smallest central square holding each fraction of the ERF,
    relative to the image side (RepLKNet's high-contribution area ratio)."""
    height, width = erf.shape
    total = erf.sum()
    ratios = []
    for fraction in fractions:
        for half in range(1, max(height, width) // 2 + 1):
            top, left = max(height // 2 - half, 0), max(width // 2 - half, 0)
            if erf[top:height // 2 + half,
                   left:width // 2 + half].sum() >= fraction * total:
                break
        ratios.append(min(2 * half / max(height, width), 1.))
    return ratios


def plot_erf_maps(maps: Sequence[Tuple[str, np.ndarray]],
                  out_file: str,
                  columns: Optional[int] = None) -> None:
    """Save log-scaled ERF maps side by side in one PNG.

    Args:
        maps (Sequence[tuple[str, ndarray]]): ``(title, erf)`` pairs.
        out_file (str): The PNG to write.
        columns (int, optional): Maps per row. Defaults to all in one row.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    columns = columns or len(maps)
    rows = -(-len(maps) // columns)
    fig, axes = plt.subplots(rows, columns, squeeze=False,
                             figsize=(2.8 * columns + 1, 2.9 * rows),
                             layout='constrained')
    for ax in axes.flat:
        ax.axis('off')
    for ax, (title, erf) in zip(axes.flat, maps):
        image = ax.imshow(log_scale(erf), cmap='RdYlGn', vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8,
                 label=f'log10(ERF / max) / {DECADES} + 1')
    out_dir = osp.dirname(out_file)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    fig.savefig(out_file, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('configs', nargs='+', metavar='CONFIG')
    parser.add_argument('--checkpoint', nargs='+', default=[],
                        help='one per CONFIG; "-" for none')
    parser.add_argument('--out', required=True, help='PNG to write')
    parser.add_argument('--images', help='folder of images (default: '
                        'synthetic)')
    parser.add_argument('--num-images', type=int, default=16)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    if args.checkpoint and len(args.checkpoint) != len(args.configs):
        parser.error('give one --checkpoint per CONFIG ("-" for none)')
    check_cli_args(parser, args, dict(num_images=1, size=1, batch_size=1))
    for path in args.checkpoint:
        if path != '-' and not osp.isfile(path):
            parser.error(f'--checkpoint: no file at {path!r}')
    if args.images is not None and not osp.isdir(args.images):
        parser.error(f'--images must be a folder of images, got '
                     f'{args.images!r}')
    if not args.out.lower().endswith('.png'):
        parser.error(f'--out must be a .png file, got {args.out!r}')
    if osp.isdir(args.out):
        parser.error(f'--out {args.out!r} is a folder; name the .png file')
    return args


def main(argv=None) -> list:
    args = parse_args(argv)
    device = torch.device(args.device)
    try:  # every input is read before the first map is computed
        cfgs = [load_config(config) for config in args.configs]
        if args.images:
            images = load_images(args.images, args.num_images, args.size)
    except (OSError, ValueError) as error:
        sys.exit(f'erf.py: {error}')
    if args.images:
        source = f'{len(images)} images of {args.images}'
    else:
        images = synthetic_images(args.num_images, args.size, args.seed)
        source = f'{len(images)} synthetic images'
    images = images.to(device)
    checkpoints = args.checkpoint or ['-'] * len(args.configs)
    maps = []
    for config, cfg, checkpoint in zip(args.configs, cfgs, checkpoints):
        name = osp.splitext(osp.basename(config))[0]
        states = [('init', None)]
        if checkpoint != '-':
            states.append(('trained', checkpoint))
        for state, path in states:
            torch.manual_seed(args.seed)
            backbone = last_stage_backbone(cfg)
            if path:
                try:
                    print(load_backbone_weights(backbone, path))
                except (OSError, ValueError, RuntimeError) as error:
                    sys.exit(f'erf.py: --checkpoint {error}')
            erf = effective_receptive_field(backbone.to(device), images,
                                            args.batch_size)
            ratios = high_contribution_ratio(erf)
            print(f'{name} ({state}): side of the central square holding '
                  f'20/30/50% of the ERF: '
                  + ' / '.join(f'{r:.2f}' for r in ratios))
            maps.append((f'{name} ({state})', erf))
    plot_erf_maps(maps, args.out, columns=2 if args.checkpoint else None)
    print(f'ERF maps of {source} at {args.size}x{args.size} -> {args.out}')
    return maps


if __name__ == '__main__':
    main()
