""" The BAM and CBAM papers' own figures for the networks of the zoo, each with the paper and table it comes from.

The one table of published figures: `bam-models list`, the benchmark and the generated model tables read it.
Values are what the papers print (parameters rounded to 0.01M, "GFLOPs" that count multiply-adds, errors in
percent), never this project's counts, so that "ours vs paper" compares a measured count with a published one.
Keys are timm model names: the zoo's and the plain trunks the papers list as their baselines.
"""
from dataclasses import dataclass
from typing import Dict, Optional

__all__ = ['PAPER_FIGURES', 'PAPER_METRICS', 'PaperFigure', 'PaperTable', 'paper_figure']

BAM_PAPER = 'BAM: Bottleneck Attention Module (Park et al., BMVC 2018)'
CBAM_PAPER = 'CBAM: Convolutional Block Attention Module (Woo et al., ECCV 2018)'


@dataclass(frozen=True)
class PaperTable:
    paper: str
    number: int
    caption: str  # what the table reports, dataset included

    def __str__(self) -> str:
        return f'{self.paper}, Table {self.number} ({self.caption})'


@dataclass(frozen=True)
class PaperFigure:
    value: float
    table: PaperTable


BAM_CIFAR100 = PaperTable(BAM_PAPER, 3, 'CIFAR-100, various architectures')
BAM_IMAGENET = PaperTable(BAM_PAPER, 4, 'ImageNet-1K')
BAM_COMPACT = PaperTable(BAM_PAPER, 5, 'ImageNet-1K, compact networks')
CBAM_IMAGENET = PaperTable(CBAM_PAPER, 4, 'ImageNet-1K')
CBAM_MOBILENET = PaperTable(CBAM_PAPER, 5, 'ImageNet-1K, light-weight networks')

# metric -> what its value means
PAPER_METRICS = {
    'params': 'parameters, as printed (millions to two decimals)',
    'gmacs': "the papers' GFLOPs, which count multiply-adds: compare with GMACs",
    'top1_error': "top-1 error in percent on the table's dataset",
    'top5_error': "top-5 error in percent on the table's dataset",
}


def _figures(table: PaperTable, **values: float) -> Dict[str, PaperFigure]:
    return {metric: PaperFigure(value, table) for metric, value in values.items()}


PAPER_FIGURES: Dict[str, Dict[str, PaperFigure]] = {
    # ImageNet-1K; the ResNet-50 baseline's GFLOPs as the BAM paper prints them (the CBAM paper has 3.858)
    'resnet50': _figures(BAM_IMAGENET, params=25.56e6, gmacs=3.86, top1_error=24.56,
                         top5_error=7.50),
    'resnet50_bam': _figures(BAM_IMAGENET, params=25.92e6, gmacs=3.94, top1_error=24.02,
                             top5_error=7.18),
    'resnet50_cbam': _figures(CBAM_IMAGENET, params=28.09e6, gmacs=3.864, top1_error=22.66,
                              top5_error=6.31),
    'resnet18_bam': _figures(BAM_IMAGENET, params=11.71e6),
    'wide_resnet18_150': _figures(BAM_IMAGENET, params=25.88e6),
    'wide_resnet18_200': _figures(BAM_IMAGENET, params=45.62e6),
    'mobilenetv1_100': _figures(CBAM_MOBILENET, params=4.23e6),
    'mobilenetv1_100_bam': _figures(BAM_COMPACT, params=4.32e6),
    'mobilenetv1_100_cbam': _figures(CBAM_MOBILENET, params=5.07e6),
    # CIFAR-100 (32 px): the plain baselines' parameters and both errors of each row
    'resnet50_cifar': _figures(BAM_CIFAR100, top1_error=21.49),
    'resnet50_cifar_bam': _figures(BAM_CIFAR100, top1_error=20.00),
    'preresnet110_cifar': _figures(BAM_CIFAR100, params=1.73e6, top1_error=22.22),
    'preresnet110_cifar_bam': _figures(BAM_CIFAR100, top1_error=21.96),
    'wrn28_8_cifar': _figures(BAM_CIFAR100, top1_error=20.40),
    'wrn28_8_cifar_bam': _figures(BAM_CIFAR100, top1_error=19.06),
    'wrn28_10_cifar': _figures(BAM_CIFAR100, params=36.54e6, top1_error=18.89),
    'wrn28_10_cifar_bam': _figures(BAM_CIFAR100, top1_error=18.56),
    'resnext29_8x64d_cifar': _figures(BAM_CIFAR100, top1_error=18.18),
    'resnext29_8x64d_cifar_bam': _figures(BAM_CIFAR100, top1_error=16.71),
    'resnext29_16x64d_cifar': _figures(BAM_CIFAR100, params=68.25e6, top1_error=17.25),
    'resnext29_16x64d_cifar_bam': _figures(BAM_CIFAR100, top1_error=16.39),
}


def paper_figure(model: str, metric: str) -> Optional[PaperFigure]:
    """The papers' figure for `metric` (a key of PAPER_METRICS) of timm model `model`, None where they give none."""
    return PAPER_FIGURES.get(model, {}).get(metric)
