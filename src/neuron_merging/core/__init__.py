"""The compression core: record → channel groups → select → assign → build.

Each module does one job of the pipeline and none imports anything outside this
package (no models, data, training, experiments or CLI):

* :mod:`.groups` finds the channel groups of a model (and validates explicit ones);
* :mod:`.select` chooses the neurons to keep (pluggable criteria);
* :mod:`.assign` gives each pruned neuron a partner and a scale;
* :mod:`.approx` does the same, in the least-squares sense, through activations
  that are not positively homogeneous (GELU, SiLU, ReLU6, Hardswish, SwiGLU);
* :mod:`.build` turns the plans into the smaller model;
* :mod:`.api` is the one straight way through, behind :func:`compress`.
"""
