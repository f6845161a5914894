"""ragstream: keep a Milvus index in step with web pages, through Kafka.

Operations live here (CLI, the local broker, the demo, the worker supervisor); the Faust
app, messages and pure logic live in :mod:`streams`; the three stages in :mod:`agents`.
"""

__version__ = "0.1.0"
