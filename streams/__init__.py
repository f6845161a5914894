"""The core of ragstream: settings, the error tree, messages, the pure logic, and the adapters
to Kafka, Milvus and the model. It imports nothing from the stages, ``ops`` or the CLI
(docs/architecture.md)."""
