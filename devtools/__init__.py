"""Development and test tooling, not part of a deployment: the local Kafka broker that
``ragstream kafka up`` fetches with Maven and starts, and the corpus server the demo, the
benchmark and the tests fetch pages from."""
