"""Model registry: configs name a model by string and `get_model` builds it.

Every weight is created with `nn.with_logical_partitioning`; the logical axis
names used are:

- conv kernels: ('conv_h', 'conv_w', 'conv_in', 'conv_out'); conv biases:
  ('conv_out',).
- dense kernels: ('embed', 'mlp') and ('mlp', 'embed') (transformer MLPs, the
  encoder stem projection, the time-embedding MLP and time-token projection),
  ('embed', 'heads') and ('heads', 'embed') (attention q/k/v and output),
  ('embed', 'conv_out') (time scale/shift of the U-Net residual blocks);
  dense biases take the kernel's output name: ('mlp',), ('embed',),
  ('heads',), ('conv_out',).
- norm scales and biases (LayerNorm, GroupNorm, BatchNorm): ('norm',).

BatchNorm running averages (`batch_stats`) are plain arrays without names;
replicate them.
"""

import flax.linen as nn

MODELS: dict[str, type[nn.Module]] = {}


def register(name: str):
  """Class decorator that adds a model class to `MODELS` under `name`.

  Args:
    name: the string configs use for the model.

  Returns:
    The decorator (it returns the class unchanged).

  Raises:
    ValueError: if the name is already taken by another class.
  """
  def decorator(cls: type[nn.Module]) -> type[nn.Module]:
    if name in MODELS and MODELS[name] is not cls:
      raise ValueError(f'Model name {name!r} is already registered to '
                       f'{MODELS[name].__name__}.')
    MODELS[name] = cls
    return cls
  return decorator


def get_model(name: str, **kwargs) -> nn.Module:
  """Builds the registered model `name` with keyword attributes.

  Args:
    name: registered model name (e.g. 'pix2seq_d').
    **kwargs: module attributes, passed to the class.

  Returns:
    The (unbound) flax module.

  Raises:
    ValueError: if the name is not registered; the message lists known names.
  """
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}; known models: '
                     f'{sorted(MODELS)}.')
  return MODELS[name](**kwargs)


# Imported last: the modules use `register` defined above to fill `MODELS`.
from pix2seq_d_jax.models import pix2seq_d  # noqa: E402, F401
