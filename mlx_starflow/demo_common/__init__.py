"""What the three demo models (demo, demo_video, demo_text) have in common, in one place.

- training.py: the AdamW warmup + cosine schedule, the identity start, the noisy-data
  gradient step and the step loop, the training flags, the stage record and the saved
  model folder with its training.json, the choice of sampling defaults over guidance
  weights on a checker, the command-line scaffolding.
- classes.py: the class-conditional pixel flows (image and video demos): the one-hot
  class prefix, bits per dimension, sampling a list of classes, held-out bits/dim.
- drawing.py: pixels to the model's range and back, an anti-aliased shape, the
  labelled picture of sample rows.

Each demo keeps its own data set, checker, configuration and defaults; the video and
text checkers, written apart from the drawing code, import nothing from here.
"""
