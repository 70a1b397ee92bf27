"""Regenerate the table of architectures tested with insert_bam / insert_cbam in docs/insert.md (run after
changing the placement rule or the list below). Parameters and FLOPs are counted as `bam-models list` counts
them: on the meta device, one 224x224 forward pass (`bam_models.benchmark`)."""
import pathlib
import re
from typing import Callable, Dict, List, Tuple

import timm
import torch
import torchvision

from bam_models import BAM, CBAM, insert_bam, insert_cbam
from bam_models.benchmark import count_flops, count_params

DOC = pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'insert.md'
START, END = '<!-- insert-table:start -->', '<!-- insert-table:end -->'

# (library, model name, attentions to insert); CBAM replaces the SE modules a model has
ARCHITECTURES: List[Tuple[str, str, Tuple[str, ...]]] = [
    ('timm', 'resnet50', ('bam', 'cbam')),
    ('timm', 'mobilenetv1_100', ('bam', 'cbam')),
    ('timm', 'convnext_tiny', ('bam',)),
    ('timm', 'efficientnet_b0', ('bam', 'cbam')),
    ('timm', 'efficientnetv2_rw_t', ('bam', 'cbam')),
    ('timm', 'regnety_008', ('bam', 'cbam')),
    ('timm', 'mobilenetv2_100', ('bam', 'cbam')),
    ('timm', 'mobilenetv3_large_100', ('bam', 'cbam')),
    ('timm', 'densenet121', ('bam',)),
    ('timm', 'cspresnet50', ('bam',)),
    ('timm', 'ghostnet_100', ('bam', 'cbam')),
    ('torchvision', 'resnet50', ('bam', 'cbam')),
    ('torchvision', 'convnext_tiny', ('bam',)),
    ('torchvision', 'efficientnet_b0', ('bam', 'cbam')),
    ('torchvision', 'efficientnet_v2_s', ('bam', 'cbam')),
    ('torchvision', 'regnet_y_400mf', ('bam', 'cbam')),
    ('torchvision', 'mobilenet_v2', ('bam',)),
    ('torchvision', 'mobilenet_v3_large', ('bam', 'cbam')),
    ('torchvision', 'densenet121', ('bam',)),
]

_INSERT: Dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {
    'bam': insert_bam,
    'cbam': lambda model: insert_cbam(model, replace_existing=True),
}


def build_meta(library: str, name: str) -> torch.nn.Module:
    """The model on the meta device (torchvision's RegNet computes its widths with tensor ops: built on CPU)."""
    if library == 'timm':
        return timm.create_model(name, device='meta')
    if name.startswith('regnet'):
        return torchvision.models.get_model(name).to('meta')
    with torch.device('meta'):
        return torchvision.models.get_model(name)


def row(library: str, name: str, attention: str) -> Dict[str, float]:
    plain = build_meta(library, name)
    params, flops = count_params(plain), count_flops(plain)
    model = _INSERT[attention](build_meta(library, name))
    cls = BAM if attention == 'bam' else CBAM
    return dict(
        model=f'{library} `{name}`', attention=attention.upper(),
        modules=sum(isinstance(m, cls) for m in model.modules()),
        params=params, params_added=count_params(model) - params,
        gflops=flops / 1e9, gflops_added=(count_flops(model) - flops) / 1e9,
    )


def render() -> str:
    lines = [
        '| model | attention | modules | params | + params | GFLOPs | + GFLOPs |',
        '|---|---|---:|---:|---:|---:|---:|',
    ]
    for library, name, attentions in ARCHITECTURES:
        for attention in attentions:
            r = row(library, name, attention)
            lines.append(
                f"| {r['model']} | {r['attention']} | {r['modules']} | {r['params']:,} | "
                f"{r['params_added']:+,} ({100 * r['params_added'] / r['params']:+.1f} %) | {r['gflops']:.3f} | "
                f"{r['gflops_added']:+.3f} ({100 * r['gflops_added'] / r['gflops']:+.1f} %) |")
    return '\n'.join(lines)


def main() -> None:
    text = DOC.read_text()
    pattern = re.compile(re.escape(START) + '.*?' + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f'{DOC} has no {START} ... {END} block to fill')
    DOC.write_text(pattern.sub(lambda _: f'{START}\n{render()}\n{END}', text))


if __name__ == '__main__':
    main()
