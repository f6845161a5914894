"""Operations on a running pipeline, as libraries: publish requests, follow progress, read
and redrive dead letters, replay a stage, expand sitemaps, receive webhooks.

The CLI (``ragstream/cli/``) only parses arguments and prints what these return; any program
can call them with its own :class:`streams.settings.Settings`.
"""
