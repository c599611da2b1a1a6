"""``aurl serve``: an HTTP API, a studio page and a listening test over the generation library.

Layers: :mod:`aurl.serve.engine` (one decode thread per model, sharing it between requests
through :class:`aurl.generation.batching.ContinuousBatcher`), :mod:`aurl.serve.uploads` (MIDI
uploads parsed in a separate process with a time and memory limit), :mod:`aurl.serve.listen`
(the blind listening test and its SQLite store), :mod:`aurl.serve.app` (the FastAPI app that
ties them together). The pages and their scripts are in ``static/``, bundled in the wheel.
Nothing here holds model code or imports training.
"""
