"""``python -m bench``: the pipeline measured against the bare model and the naive design.

Three runs in one process, on the same Django pages and the same chunk texts:

- ``bare``: the embedding model alone, encoding exactly the pipeline's chunks in its best
  batches (the limit: what the hardware can do);
- ``naive``: per page, in sequence: fetch, chunk, embed, insert (the design replaced);
- ``pipeline``: the real thing, ``ragstream worker`` processes on Kafka and Milvus Lite.

See ``bench/README.md`` for what each figure means and how to run it.
"""
