"""Training DiffiT: what `python -m diffit train | encode | demo` needs and sampling does not.

    config.py     TrainConfig (defaults < --config JSON < flags), imported by the loop and families
    train.py      the Trainer loop and `python -m diffit train` (re-exports the training API)
    families.py   how each model family builds, trains and samples (latent ADM, image-space EDM)
    state.py      process group, stop signals, random state, checkpoint files
    feedback.py   metrics, loss plot, sample grids, progress
    ema.py        the EMA of the weights
    data.py       digits, image folders, latent files, the resumable sampler
    encode.py     `python -m diffit encode`: images to VAE latents
    demo.py       `python -m diffit demo`: the digits run end to end

The models, their layers, diffusion and sampling live one level up in diffit/ and never import
this package at module level except sampling's use of the families and checkpoint layout.
"""
