"""Inference: samplers, the image and video predictors, inputs and writers.

`sampling` holds the pure samplers (encoder once, decoder steps in
`lax.scan`); `predictor.Predictor` and `video_predictor.VideoPredictor`
wrap a restored model around them; `inputs` finds images and sequences on
disk and `writers` writes COCO panoptic and DAVIS results.
"""
