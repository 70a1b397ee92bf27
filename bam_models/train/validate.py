""" Top-1, top-5 and loss of a model on a folder dataset or the digits test split, with the preprocessing
the model was trained with (its pretrained_cfg, a `local-dir:` config.json, or the data config stored in a
`bam-models train` checkpoint), the same way `bam-models train` evaluates. """
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from timm.data import create_transform, resolve_data_config

from bam_models.errors import UsageError
from bam_models.hub.load import create_model_from_name
from bam_models.train.data import DIGITS, build_dataset, dataset_classes, decode_as_rgb
from bam_models.train.loop import evaluate

__all__ = ['validate']

# the folder names timm's reader accepts for an evaluation split, in its order of preference
EVAL_SPLITS = ('validation', 'val', 'valid', 'eval', 'evaluation')


def _positive(name: str, value: Optional[int]) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{name} must be a positive number, got {value}; pass e.g. {name} 32")


def _check_split(data: str, split: str) -> None:
    """A folder must hold the split: timm's reader would silently read all of `data` when it does not."""
    if not Path(data).is_dir():
        raise UsageError(f"--data {data} is neither 'digits' nor a folder; pass a folder with a "
                         f"{split}/ split in ImageFolder layout (<split>/<class>/<image>) or 'digits'")
    names = tuple(dict.fromkeys((split,) + (EVAL_SPLITS if split in EVAL_SPLITS else ())))
    for name in names:
        if (Path(data) / name).is_dir():
            return
    raise UsageError(f"--data {data} has no {split} split (looked for {', '.join(f'{n}/' for n in names)}); "
                     f"put the images in {data}/{split}/<class>/ or pass --split NAME")


def _device(device: str) -> torch.device:
    if device == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        target = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device} is not a device; pass cpu, cuda, cuda:N or auto") from None
    if target.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here; pass --device cpu")
    return target


def validate(model_name: str, data: str, checkpoint: Optional[str] = None, split: str = 'validation',
             batch_size: int = 64, img_size: Optional[int] = None, workers: int = 0,
             device: str = 'cpu') -> Dict[str, Any]:
    """Scores `model_name` (weights: `checkpoint`, else pretrained) on `data`'s `split` ('digits': its test
    split) on `device` ('cpu', 'cuda', 'cuda:N' or 'auto'); returns model, checkpoint, data, input_size, loss,
    top1, top5 and count."""
    target = _device(device)
    _positive('--batch-size', batch_size)
    _positive('--img-size', img_size)
    if workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {workers}; pass 0 to load in this process")
    if data != DIGITS:
        _check_split(data, split)
    model = create_model_from_name(model_name, checkpoint)
    data_config = resolve_data_config({'input_size': (3, img_size, img_size)} if img_size else {}, model=model)
    try:
        dataset = build_dataset(data, 'val', val_split=split)
    except RuntimeError as error:  # timm's folder reader: "Found 0 images in subfolders of ..."
        raise UsageError(f"the {split} split of {data} holds no images ({error}); put the images in "
                         f"{split}/<class>/ folders") from None
    classes = dataset_classes(dataset)
    if len(classes) > model.num_classes:
        raise UsageError(f"{data} has {len(classes)} classes but {model_name} predicts {model.num_classes}; "
                         f"pass the checkpoint trained on this data")
    dataset.transform = create_transform(**data_config, is_training=False)
    decode_as_rgb(dataset)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    metrics = evaluate(model.to(target), loader, target)
    return dict(model=model_name, checkpoint=checkpoint, data=data, input_size=list(data_config['input_size']),
                **metrics)
