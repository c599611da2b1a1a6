"""Evaluation: how good a model's music is, in numbers.

- :mod:`~aurl.evaluation.metrics`: musical metrics, pure functions over note arrays (MusPy and
  Yang & Lerch definitions); also used for training-time sample monitoring.
- :mod:`~aurl.evaluation.likelihood`: loss, perplexity and bits per note of token sequences.
- :mod:`~aurl.evaluation.distances`: intra-/inter-set distances, KDE, overlap area, KL and the
  Frechet distance between a generated and a reference set.
- :mod:`~aurl.evaluation.ngram`: the Kneser-Ney token n-gram baseline.
- :mod:`~aurl.evaluation.report`: ``metrics.json`` and ``report.md`` with plots.

Submodules are imported explicitly (``likelihood`` pulls in torch; ``metrics`` does not).
"""
