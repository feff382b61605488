"""On-disk formats shared by data, evaluation, evaluators and predict.

One codec of each kind, below every other package (this package imports
nothing else from pix2seq_d_jax): `coco_panoptic` (RGB-encoded panoptic PNGs
and their JSON), `davis` (palette PNGs of object ids), `kitti_step` (STEP
panoptic PNGs) and `atomic` (write-then-rename files through `etils.epath`,
so a crash never leaves a truncated file and a bucket is just another path).
"""
