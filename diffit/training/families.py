"""Model families for `python -m diffit train`: the only model-specific training code.

A preset name picks its family (family_of): latent presets ("DiffiT-S/2", ..., "DiffiT-XL/2",
"DiffiT-tiny") train with the ADM / DiT Gaussian diffusion loss and sample with its ancestral
sampler (_latent_family); image-space presets ("tiny", "cifar10", "ffhq64") train with EDM's loss
and sample with EDM's Heun sampler (_image_family). Add a family by writing a builder returning a
Family and listing it in FAMILIES.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Sequence, Tuple

import torch

if TYPE_CHECKING:
    from .config import TrainConfig


@dataclass(frozen=True)
class Family:
    """How to build, train and sample one model family.

    build(preset, overrides, grad_checkpointing) -> raw network
    native(preset) -> (image_size, channels) the preset was made for
    data_overrides(dataset, cfg) -> preset-config overrides that fit the model to the data
    make_loss(model, cfg) -> loss(net, x, y) -> per-sample loss [B] (net: the maybe-wrapped model)
    sample(ema_module, noise, labels, cfg) -> samples shaped like noise (data space)
    block_types() -> module types that are FSDP units
    """
    name: str
    presets: Callable[[], Sequence[str]]
    build: Callable[..., Any]
    native: Callable[[str], Tuple[int, int]]
    data_overrides: Callable[[Any, TrainConfig], dict]
    make_loss: Callable[[Any, TrainConfig], Callable]
    sample: Callable[..., Any]
    block_types: Callable[[], tuple]


def _latent_family() -> Family:
    def presets():
        from ..latent import PRESETS
        return list(PRESETS)

    def build(preset, overrides, grad_checkpointing):
        from ..latent import DiffiT
        return DiffiT.from_preset(preset, **overrides, grad_checkpointing=grad_checkpointing)

    def native(preset):
        from ..latent import preset_config
        c = preset_config(preset)
        return c.input_size, c.in_channels

    def data_overrides(ds, cfg):
        classes = ds.num_classes if cfg.class_cond else 0
        return dict(input_size=ds.image_size, in_channels=ds.channels, num_classes=classes,
                    class_dropout_prob=cfg.class_dropout if classes else 0.0,
                    backend=cfg.backend)

    def make_loss(model, cfg):
        if cfg.augment:
            raise ValueError(f"augment={cfg.augment} applies to the image-space presets only "
                             f"(EDM's recipe); the latent model {cfg.model!r} trains without it")
        from ..diffusion import create_diffusion
        diffusion = create_diffusion(None, learn_sigma=model.learn_sigma)

        def loss(net, x, y):
            t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
            kw = {"y": y} if y is not None else {}
            return diffusion.training_losses(net, x, t, kw)["loss"]           # [B]
        return loss

    def sample(ema, noise, labels, cfg):
        from ..diffusion import create_diffusion
        diffusion = create_diffusion(str(cfg.sample_steps or 250), learn_sigma=ema.learn_sigma)
        gen = torch.Generator(noise.device).manual_seed(cfg.seed)
        if labels is not None and cfg.guidance != 1.0:
            null = torch.full_like(labels, ema.num_classes)
            x = diffusion.p_sample_loop(
                ema.forward_with_cfg, (2 * noise.shape[0], *noise.shape[1:]),
                noise=torch.cat([noise, noise]), generator=gen,
                model_kwargs=dict(y=torch.cat([labels, null]), cfg_scale=cfg.guidance))
            return x[: noise.shape[0]]
        kw = {"y": labels} if labels is not None else {}
        return diffusion.p_sample_loop(ema, noise.shape, noise=noise, model_kwargs=kw,
                                       generator=gen)

    def block_types():
        from ..layers import AdaLNBlock, DiffiTBlock
        return (DiffiTBlock, AdaLNBlock)

    return Family("latent", presets, build, native, data_overrides, make_loss, sample,
                  block_types)


def _image_family() -> Family:
    def presets():
        from ..unet import PRESETS
        return list(PRESETS)

    def build(preset, overrides, grad_checkpointing):
        from ..unet import DiffiTResBlock, DiffiTUNet
        # channels_last: the token <-> image reshapes around every DiffiT block are views (NCHW
        # would copy the feature map into tokens in each block), and the convolutions run
        # cuDNN's NHWC kernels; the benchmark times the U-Net this way too
        model = DiffiTUNet.from_preset(preset, **overrides).to(memory_format=torch.channels_last)
        if grad_checkpointing:
            # the U-Net has no switch of its own: wrap each ResBlock in torch's non-reentrant
            # activation checkpointing (state-dict keys are unchanged by the wrapper)
            from functools import partial

            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
                CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)
            apply_activation_checkpointing(
                model, checkpoint_wrapper_fn=partial(checkpoint_wrapper,
                                                     checkpoint_impl=CheckpointImpl.NO_REENTRANT),
                check_fn=lambda m: isinstance(m, DiffiTResBlock))
        return model

    def native(preset):
        from ..unet import PRESETS
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}")
        return PRESETS[preset].image_size, PRESETS[preset].in_channels

    def data_overrides(ds, cfg):
        from ..augment import AugmentPipe
        from ..unet import PRESETS
        classes = ds.num_classes if cfg.class_cond else 0
        # augmentation conditions the network on the pipe's labels: a preset without label
        # slots (tiny) gets them; one that has them (cifar10, ffhq64) keeps its own
        aug = {}
        if cfg.augment and not PRESETS[cfg.model].augment_dim:
            aug = dict(augment_dim=AugmentPipe(cfg.augment).label_dim)
        return dict(image_size=ds.image_size, in_channels=ds.channels, num_classes=classes,
                    class_dropout_prob=cfg.class_dropout if classes else 0.0,
                    backend=cfg.backend, **aug)

    def make_loss(model, cfg):
        from ..diffusion.edm import EDMLoss, EDMPrecond
        edm = EDMLoss(augment=cfg.augment or None)
        if edm.augment_pipe is not None and model.config.augment_dim != edm.augment_pipe.label_dim:
            raise ValueError(f"augment={cfg.augment} conditions the network on "
                             f"{edm.augment_pipe.label_dim} augmentation labels, but the model "
                             f"was built with augment_dim={model.config.augment_dim}")

        def loss(net, x, y):
            return edm(EDMPrecond(net), x, y)                                 # [B]
        return loss

    def sample(ema, noise, labels, cfg):
        from ..diffusion.edm import EDMPrecond, guided_denoiser, heun_sampler
        net = EDMPrecond(ema)
        if labels is not None and cfg.guidance != 1.0:
            net = guided_denoiser(net, cfg.guidance, ema.config.num_classes)
        return heun_sampler(net, noise, labels,
                            num_steps=cfg.sample_steps or ema.config.heun_steps)

    def block_types():
        from ..unet import DiffiTResBlock
        return (DiffiTResBlock,)

    return Family("image", presets, build, native, data_overrides, make_loss, sample,
                  block_types)


FAMILIES: Dict[str, Callable[[], Family]] = {"latent": _latent_family, "image": _image_family}


def family_of(preset: str) -> Family:
    for make in FAMILIES.values():
        fam = make()
        if preset in fam.presets():
            return fam
    known = {name: make().presets() for name, make in FAMILIES.items()}
    raise ValueError(f"unknown model preset {preset!r}; presets: {known}")

