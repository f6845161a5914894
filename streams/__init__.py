"""The Faust app, settings, topics, message codecs and the pure logic of ragstream."""
