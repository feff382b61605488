"""Diffusion over analog bits: bit codes, noise schedules, losses, sampler.

The pieces of Pix2Seq-D that do not depend on the network: how a panoptic
mask becomes analog bits and back (`analog_bits`), the signal level gamma(t)
and the forward noise (`schedules`), the training losses and the x0 estimate
read from the decoder's output (`losses`), and the iterative DDIM / DDPM
sampler run as one `jax.lax.scan` (`sampler`). Pure jax and numpy.
"""

from pix2seq_d_jax.diffusion.analog_bits import (
    BIT_CODES,
    analog_bits_to_mask,
    bits_to_int,
    code_table,
    int_to_bits,
    mask_to_analog_bits,
)
from pix2seq_d_jax.diffusion.losses import (
    LOSS_TYPES,
    bits_from_mask,
    diffusion_loss,
    num_output_channels,
    predict_x0,
)
from pix2seq_d_jax.diffusion.sampler import SAMPLERS, sample
from pix2seq_d_jax.diffusion.schedules import SCHEDULES, add_noise, gamma

__all__ = [
    'BIT_CODES',
    'LOSS_TYPES',
    'SAMPLERS',
    'SCHEDULES',
    'add_noise',
    'analog_bits_to_mask',
    'bits_from_mask',
    'bits_to_int',
    'code_table',
    'diffusion_loss',
    'gamma',
    'int_to_bits',
    'mask_to_analog_bits',
    'num_output_channels',
    'predict_x0',
    'sample',
]
