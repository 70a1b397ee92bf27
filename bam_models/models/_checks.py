""" Input validation shared by the zoo's model classes. """
import torch


__all__ = ['check_image_batch']


def check_image_batch(x: torch.Tensor, in_chans: int, min_size: int) -> None:
    """Raise a ValueError naming the expected shape unless x is a (B, in_chans, H, W) batch with H, W >= min_size.

    The raise depends on the input shape, which FX cannot trace: calling modules register it with torch.fx.wrap.
    `min_size` is the network's total stride: below it the last stage sees less than one pixel of image and
    its attention and pooling run on padding alone.
    """
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(
            f"expected an image batch of shape (B, {in_chans}, H, W), got shape {list(x.shape)}; "
            f"convert the images to {in_chans} channels or create the model with the matching in_chans")
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(
            f"expected H and W of at least {min_size} (the network's total stride), got shape {list(x.shape)}; "
            f"resize the images to {min_size}x{min_size} or larger")
