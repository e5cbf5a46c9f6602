"""FLOPs and throughput of classifiers from 64 to 1024 pixels.

    python benchmarks/scaling.py [--models vmamba-t ... deit-s]
        [--sizes 64 128 224 384 512 768 1024] [--device cuda]
        [--batch 64] [--max-batch 1024] [--mode infer-fp32] [--flops-only]
        [--from-csv] --out-dir DIR

Writes DIR/scaling.csv (columns: :data:`COLUMNS`), DIR/scaling_flops.png
(GFLOPs against size; VMamba's paper and 9*BLDN scan counts) and
DIR/scaling_throughput.png (images per second against size). The CSV is
rewritten after each measurement; ``--from-csv`` re-plots it.

:func:`sweep` counts each model's FLOPs (both scan conventions, see
:mod:`model_flops`) and times it at square sizes; the batch shrinks with the
image area (``--batch`` images at 224, at least one, at most
``--max-batch``) so that every size moves about as many pixels.
:func:`write_csv` and :func:`plot` save the rows, :func:`read_csv` reads
them back.
"""
import argparse
import csv
import os
import os.path as osp
from typing import Callable, Dict, List, Optional, Sequence

import torch
from model_flops import count_flops
from models import MODEL_ZOO, build_classifier, model_label, tensor_forward
from timing import MODES, check_cli_args, device_name, time_mode

COLUMNS = ('model', 'size', 'params_m', 'gflops_paper', 'gflops_later',
           'batch', 'mode', 'ms', 'img_per_s', 'peak_gib', 'status',
           'device', 'scan')


def batch_for(size: int, batch_at_224: int, max_batch: int = 1024) -> int:
    """Images per iteration at ``size``: constant pixels, 1 to max_batch."""
    return min(max_batch, max(1, round(batch_at_224 * (224 / size)**2)))


def sweep(models: Sequence[str],
          sizes: Sequence[int],
          device: torch.device,
          batch_at_224: int = 32,
          max_batch: int = 1024,
          mode: str = 'infer-fp32',
          warmup: int = 3,
          repeat: int = 10,
          throughput: bool = True,
          on_row: Optional[Callable[[List[Dict]], None]] = None,
          log=print) -> List[Dict]:
    """FLOPs and (optionally) timings of each model at each size.

    Args:
        models (Sequence[str]): Names of :data:`models.MODEL_ZOO` or
            classifier configs.
        sizes (Sequence[int]): Square input sizes.
        device (torch.device): Where to count and time.
        batch_at_224 (int): Batch at 224; scaled by area for other sizes.
        max_batch (int): Largest batch at small sizes.
        mode (str): Timing mode (:data:`timing.MODES`).
        warmup (int): Untimed iterations.
        repeat (int): Timed iterations (median).
        throughput (bool): Time the models; if False, FLOPs only.
        on_row (Callable, optional): Called with the rows so far after each
            measurement (to save partial results).
        log (Callable): Called with one line per measurement.

    Returns:
        list[dict]: One row per model and size, keys :data:`COLUMNS`
        (``None`` where not measured).
    """
    built = {name: build_classifier(name).to(device) for name in models}
    rows = []
    # sizes outermost: a run cut short still has every model at small sizes
    for size in sizes:
        batch = batch_for(size, batch_at_224, max_batch)
        for name, model in built.items():
            flops = count_flops(
                tensor_forward(model, 'mmpretrain', 1, (size, size)),
                (torch.randn(1, 3, size, size, device=device), ))
            row = dict(
                model=model_label(name), size=size,
                params_m=flops.params / 1e6,
                gflops_paper=flops.total('paper') / 1e9,
                gflops_later=flops.total('later') / 1e9, batch=batch,
                mode=mode, ms=None, img_per_s=None, peak_gib=None,
                status='flops only', device=device_name(device), scan=None)
            if throughput:
                row.update(
                    time_mode(
                        tensor_forward(model, 'mmpretrain', batch,
                                       (size, size)), mode, batch, size,
                        device, warmup, repeat))
            rows.append(row)
            if on_row is not None:
                on_row(rows)
            log(', '.join(f'{k}={_text(row[k])}' for k in COLUMNS[:11]))
    return rows


def _text(value) -> str:
    if value is None:
        return ''
    return f'{value:.4g}' if isinstance(value, float) else str(value)


def write_csv(rows: Sequence[Dict], path: str) -> None:
    """Write rows with the columns :data:`COLUMNS`."""
    _makedirs_for(path)
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _text(row.get(k)) for k in COLUMNS})


def read_csv(path: str) -> List[Dict]:
    """Rows of a CSV written by :func:`write_csv` (numbers parsed)."""
    numbers = {'size': int, 'batch': int, 'params_m': float,
               'gflops_paper': float, 'gflops_later': float, 'ms': float,
               'img_per_s': float, 'peak_gib': float}
    with open(path, newline='') as f:
        return [{
            k: (numbers[k](v) if v else None) if k in numbers else v
            for k, v in row.items()
        } for row in csv.DictReader(f)]


def _makedirs_for(path: str) -> None:
    folder = osp.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)


def plot(rows: Sequence[Dict], flops_png: str,
         throughput_png: Optional[str] = None) -> None:
    """Plot GFLOPs and img/s against the input size, one line per model.

    VMamba models get a second, dashed FLOPs line for the ``later`` scan
    convention (solid: the paper's). Both axes are logarithmic.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r['model'] for r in rows))
    colours = dict(zip(names, plt.get_cmap('tab10').colors))

    def series(name, key):
        points = [(r['size'], r[key]) for r in rows
                  if r['model'] == name and r.get(key) is not None]
        return zip(*sorted(points)) if points else ((), ())

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for name in names:
        ax.plot(*series(name, 'gflops_paper'), 'o-', color=colours[name],
                label=name)
        if name.startswith('vmamba'):
            ax.plot(*series(name, 'gflops_later'), 'o--',
                    color=colours[name], label=f'{name} (scan 9BLDN)')
    _finish(ax, 'GFLOPs', 'FLOPs vs input size (solid: paper convention)',
            rows)
    _save(fig, flops_png)

    if throughput_png is None:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for name in names:
        ax.plot(*series(name, 'img_per_s'), 'o-', color=colours[name],
                label=name)
    device = rows[0]['device'] if rows else ''
    mode = rows[0]['mode'] if rows else ''
    _finish(ax, 'images / s', f'Throughput vs input size ({mode}, {device})',
            rows)
    _save(fig, throughput_png)


def _finish(ax, ylabel: str, title: str, rows: Sequence[Dict]) -> None:
    sizes = sorted({r['size'] for r in rows})
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel('input size (pixels, square)')
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt
    _makedirs_for(path)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


DEFAULT_MODELS = ['vmamba-t', 'vmamba-s', 'vmamba-b', 'swin-t', 'convnext-t',
                  'resnet-50', 'deit-s']
DEFAULT_SIZES = [64, 128, 224, 384, 512, 768, 1024]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=DEFAULT_MODELS,
                        help=f'names of {sorted(MODEL_ZOO)} or classifier '
                        'configs')
    parser.add_argument('--sizes', nargs='+', type=int,
                        default=DEFAULT_SIZES)
    parser.add_argument('--device', default='cuda' if
                        torch.cuda.is_available() else 'cpu')
    parser.add_argument('--batch', type=int, default=64,
                        help='batch at 224 (scaled by area)')
    parser.add_argument('--max-batch', type=int, default=1024)
    parser.add_argument('--mode', default='infer-fp32', choices=MODES)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--repeat', type=int, default=10)
    parser.add_argument('--flops-only', action='store_true',
                        help='count FLOPs, time nothing')
    parser.add_argument('--from-csv', action='store_true',
                        help='only re-plot OUT_DIR/scaling.csv')
    parser.add_argument('--out-dir', required=True)
    args = parser.parse_args(argv)
    check_cli_args(parser, args, dict(sizes=1, batch=1, max_batch=1, warmup=0,
                                      repeat=1))
    return args


def main(argv=None) -> list:
    args = parse_args(argv)
    csv_path = osp.join(args.out_dir, 'scaling.csv')
    if args.from_csv:
        rows = read_csv(csv_path)
    else:
        # the CSV is rewritten after every row: a killed run keeps its rows
        rows = sweep(args.models, args.sizes, torch.device(args.device),
                     args.batch, args.max_batch, args.mode, args.warmup,
                     args.repeat, throughput=not args.flops_only,
                     on_row=lambda rows: write_csv(rows, csv_path))
    timed = any(r['img_per_s'] is not None for r in rows)
    flops_png = osp.join(args.out_dir, 'scaling_flops.png')
    speed_png = (osp.join(args.out_dir, 'scaling_throughput.png')
                 if timed else None)
    plot(rows, flops_png, speed_png)
    print(f'wrote {csv_path}, {flops_png}' +
          (f', {speed_png}' if speed_png else ''))
    return rows


if __name__ == '__main__':
    main()
