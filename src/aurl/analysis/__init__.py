"""Musical analysis over note arrays: the one implementation generation and evaluation use.

- :mod:`~aurl.analysis.keys`: key names and scales, Krumhansl-Schmuckler key finding, windowed
  keys and modulations, exact pitch-class time per interval (chroma).
- :mod:`~aurl.analysis.chords`: template chord recognition, Roman numerals, progression
  n-grams and Markov matrix, cadences.
- :mod:`~aurl.analysis.structure`: bar self-similarity, novelty, repeats, form labels, phrases.
- :mod:`~aurl.analysis.melody`: skyline melody, contour, intervals, range, motifs.
- :mod:`~aurl.analysis.report`: one piece or a corpus as JSON, Markdown, HTML and plots.
"""
